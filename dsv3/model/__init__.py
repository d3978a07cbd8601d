"""The DeepSeek-V3 model in plain PyTorch (no DeepSpeed, no process groups).

Files: ``norm.py`` RMSNorm; ``rope.py`` rotary embeddings + YaRN; ``attention.py`` MLA and the
latent decode cache; ``moe.py`` dense MLP, sigmoid gate, grouped experts, DeepSeekMoE;
``transformer.py`` blocks, MTP modules, the full model, ``init_weights`` and counts;
``objective.py`` the training loss (LM + lambda x MTP + alpha x balance) and its label counts; ``init.py``
the layout-independent per-tensor initialization (``materialize_`` allocates and initializes
only the parameters a process owns).
"""

from dsv3.model.attention import MLA, LatentCache
from dsv3.model.init import init_tensor_, materialize_, tensor_seed
from dsv3.model.moe import MLP, Experts, Gate, MoE
from dsv3.model.norm import RMSNorm
from dsv3.model.objective import IGNORE_INDEX, ce_sum, label_counts, training_loss
from dsv3.model.rope import (
    apply_rope,
    rope_cos_sin,
    rope_frequencies,
    yarn_mscale,
    yarn_rope_scale,
    yarn_softmax_scale,
)
from dsv3.model.transformer import (
    Block,
    MTPModule,
    TrainOutput,
    Transformer,
    count_parameters,
    flops_per_token,
)

__all__ = [
    "MLA",
    "LatentCache",
    "MLP",
    "MoE",
    "Experts",
    "Gate",
    "RMSNorm",
    "apply_rope",
    "rope_cos_sin",
    "rope_frequencies",
    "yarn_mscale",
    "yarn_rope_scale",
    "yarn_softmax_scale",
    "IGNORE_INDEX",
    "Block",
    "MTPModule",
    "Transformer",
    "TrainOutput",
    "ce_sum",
    "count_parameters",
    "flops_per_token",
    "init_tensor_",
    "label_counts",
    "materialize_",
    "tensor_seed",
    "training_loss",
]
