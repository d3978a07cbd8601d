"""Weights files read tensor by tensor, so that a process loads only what it holds.

A *weights source* (:class:`dsv3.model.init.WeightsSource`) maps the names of the unsplit
:class:`dsv3.model.Transformer` to shapes and reads one tensor, or one block of rows of a
stacked expert tensor, at a time. :func:`dsv3.model.init.materialize_` with ``source=`` fills
a model built on the meta device from one: a pipeline stage reads only its own tensors, an
expert-parallel rank only rows ``[first, first + n)`` of each stacked expert tensor
(``safe_open(...).get_slice``), so no process ever holds the whole model. Training uses it for
``train.init_from`` and for resuming a checkpoint under another parallel layout.

Sources:

- :class:`CheckpointWeights`: a dsv3 checkpoint's ``model.safetensors`` (stacked experts).
- :class:`dsv3.checkpoint.hf_import.HFWeights`: a Hugging Face DeepSeek-V3 folder (per-expert keys,
  possibly sharded and FP8 block-quantized), through the importer's plan.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dsv3.config import ModelConfig
from dsv3.errors import DsvError
from dsv3.model import Transformer


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the unsplit model's state dict (parameters and the
    routing biases; not the non-persistent rope tables), computed on the meta device."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def shape_problems(have: dict[str, tuple[int, ...]], cfg: ModelConfig) -> list[str]:
    """What differs between the tensors ``have`` (name -> shape) and those ``cfg`` gives:
    ``["missing NAME", "unexpected NAME", "NAME has shape S, the config gives T", ...]``."""
    want = expected_shapes(cfg)
    return (
        [f"missing {k}" for k in sorted(set(want) - set(have))]
        + [f"unexpected {k}" for k in sorted(set(have) - set(want))]
        + [
            f"{k} has shape {tuple(have[k])}, the config gives {want[k]}"
            for k in sorted(set(want) & set(have))
            if tuple(have[k]) != want[k]
        ]
    )


class CheckpointWeights:
    """A dsv3 ``model.safetensors`` (the unsplit model's state dict, experts stacked (E, ...)),
    read one tensor or one row block at a time (a :class:`dsv3.model.init.WeightsSource`).

    Only the header is read on construction; ``read`` memory-maps the file and copies the
    requested tensor (rows) out, in its stored dtype.

    Args:
        path: the ``model.safetensors`` file.
        cfg: the model config the file must match (names and shapes).
        against: how the config is named in the error (``"its config.yaml"``).

    Attributes:
        shapes: name -> shape as stored.

    Raises:
        DsvError: the file is missing or unreadable ("... the checkpoint is corrupt"), or its
            names / shapes differ from ``cfg`` (one line naming the first difference).
    """

    def __init__(self, path: str | Path, cfg: ModelConfig, against: str = "its config.yaml"):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        self._file: Any = None
        try:
            self._file = safe_open(str(self.path), framework="pt")
            self.shapes = {k: tuple(self._file.get_slice(k).get_shape()) for k in self._file.keys()}
        except (SafetensorError, OSError) as exc:
            raise DsvError(f"cannot read {self.path} ({exc}); the checkpoint is corrupt, use another one") from None
        problems = shape_problems(self.shapes, cfg)
        if problems:
            raise DsvError(
                f"{self.path} does not match {against} ({problems[0]}; {len(problems)} problem(s)); "
                "use a matching checkpoint"
            )

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` (CPU, stored dtype), or only its rows ``[a, b)`` with ``rows=(a, b)``.

        Raises:
            KeyError: no such tensor.
        """
        if name not in self.shapes:
            raise KeyError(name)
        if self._file is None:
            from safetensors import safe_open

            self._file = safe_open(str(self.path), framework="pt")
        if rows is None:
            return self._file.get_tensor(name)
        return self._file.get_slice(name)[rows[0] : rows[1]]

    def close(self) -> None:
        """Release the memory map (a later ``read`` opens the file again)."""
        self._file = None

    def __enter__(self) -> CheckpointWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["CheckpointWeights", "expected_shapes", "shape_problems"]
