"""Starting a run from existing weights (``train.init_from``): its model section, its tokenizer,
and the context-extension fields a config may change (DeepSeek-V3 report §4.3)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from dsv3.checkpoint import TOKENIZER, is_hf_folder, open_weights, resolve_checkpoint
from dsv3.config import Config, extend_model, validate
from dsv3.errors import DsvError
from dsv3.model.init import WeightsSource
from dsv3.tokenizer_files import find_tokenizer


def with_init_from(cfg: Config) -> tuple[Config, WeightsSource | None, str]:
    """Open ``train.init_from`` and adopt its model section (and, unless set, its tokenizer:
    ``tokenizer.json`` or ``tokenizer.model``, see :func:`dsv3.tokenizer_files.find_tokenizer`).

    The model section is the weights' own, except the context-extension fields (YaRN,
    ``max_seq_len``) that the config sets explicitly (:func:`dsv3.config.extend_model`).
    Reads only the headers (names, shapes) and configs; each rank later reads the tensors it
    holds (:func:`dsv3.model.init.materialize_` with the returned source).

    Returns:
        (config, weights source of the initial weights, see :func:`dsv3.checkpoint.open_weights`,
        the changed model fields as :func:`extension_changes` words them), or (cfg, None, "")
        without init_from.

    Raises:
        DsvError: ``init_from`` holds no loadable model, the config changes an architecture
            field or shrinks the context, or the result is invalid.
    """
    if not cfg.train.init_from:
        return cfg, None, ""
    cfg = copy.deepcopy(cfg)
    # e.g. mtp_depth as present in the weights, not as config.json claims; the context-extension
    # fields (YaRN, max_seq_len) as the config sets them
    saved, source = open_weights(cfg.train.init_from)
    cfg.model = extend_model(saved, cfg, str(cfg.train.init_from))
    if cfg.data.tokenizer is None:
        src = Path(cfg.train.init_from)
        found = find_tokenizer(src)
        if found is None and not is_hf_folder(src):
            found = find_tokenizer(resolve_checkpoint(src))
        if found is None:
            raise DsvError(
                f"train.init_from={src} has no tokenizer ({TOKENIZER} or tokenizer.json); set "
                "data.tokenizer to the tokenizer these weights were trained with"
            )
        cfg.data.tokenizer = str(found)
    validate(cfg)
    return cfg, source, extension_changes(saved, cfg.model)


def extension_changes(saved, model) -> str:
    """``"model.rope_factor 1.0 -> 4.0, ..."``: the fields in which ``model`` differs from the
    weights' ``saved`` config ("" when none)."""
    return ", ".join(
        f"model.{f.name} {getattr(saved, f.name)} -> {getattr(model, f.name)}"
        for f in dataclasses.fields(saved)
        if getattr(saved, f.name) != getattr(model, f.name)
    )
