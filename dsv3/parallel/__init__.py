"""Parallelism applied around the plain model: process groups, layouts and the DeepSpeed engine.

See ``dsv3/parallel/README.md`` for the modules. Importing this package picks DeepSpeed's CPU
accelerator when no GPU is visible (``DS_ACCELERATOR=cpu`` unless already set), before any
module here imports DeepSpeed, so that DeepSpeed neither guesses nor warns about it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
