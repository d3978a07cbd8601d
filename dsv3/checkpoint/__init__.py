"""The on-disk formats of dsv3, in one place: run and checkpoint folders, safetensors files,
Hugging Face folders, and loading a model from any of them.

Modules, from the bottom up:

- :mod:`~dsv3.checkpoint.files`: folder layout and file names (one constant each), finding
  the checkpoint of a run directory, reading its saved config, checking it is intact;
- :mod:`~dsv3.checkpoint.safetensors_io`: the one dtype table and byte layout, a
  single-process writer and the collective in-place writer of split runs;
- :mod:`~dsv3.checkpoint.weights`: the unsplit model's names and shapes, one shape check,
  and a checkpoint's weights read by tensor or by rows (what each rank holds);
- :mod:`~dsv3.checkpoint.hf_config`, :mod:`~dsv3.checkpoint.hf_import`,
  :mod:`~dsv3.checkpoint.hf_export`: the Hugging Face DeepSeek-V3 layout both ways;
- :mod:`~dsv3.checkpoint.loading`: :func:`load_model`, :func:`load_tokenizer`,
  :func:`open_weights`;
- :mod:`~dsv3.checkpoint.offload`: big-model placement over GPUs, CPU memory and disk.

Nothing here imports DeepSpeed; writing the training state is :mod:`dsv3.training.checkpoint`.
"""

from dsv3.checkpoint.files import (
    CHECKPOINTS,
    CONFIG,
    HF_CONFIG,
    LATEST,
    LAYOUT_FREE,
    MANIFEST,
    TOKENIZER,
    WEIGHTS,
    checkpoint_problem,
    interrupted_saves,
    is_hf_folder,
    read_checkpoint_config,
    resolve_checkpoint,
    resume_candidates,
    saved_world_size,
    tag_for,
)
from dsv3.checkpoint.hf_export import export_hf
from dsv3.checkpoint.hf_import import HFWeights, import_hf, load_hf_model
from dsv3.checkpoint.loading import load_model, load_tokenizer, open_weights, tokenizer_path
from dsv3.checkpoint.weights import CheckpointWeights, expected_shapes, shape_problems

__all__ = [
    "CHECKPOINTS",
    "CONFIG",
    "HF_CONFIG",
    "LATEST",
    "LAYOUT_FREE",
    "MANIFEST",
    "TOKENIZER",
    "WEIGHTS",
    "CheckpointWeights",
    "HFWeights",
    "checkpoint_problem",
    "expected_shapes",
    "export_hf",
    "import_hf",
    "interrupted_saves",
    "is_hf_folder",
    "load_hf_model",
    "load_model",
    "load_tokenizer",
    "open_weights",
    "read_checkpoint_config",
    "resolve_checkpoint",
    "resume_candidates",
    "saved_world_size",
    "shape_problems",
    "tag_for",
    "tokenizer_path",
]
