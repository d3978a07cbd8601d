"""RMSNorm (Zhang & Sennrich, 2019), used before attention, FFN, the head and inside MLA."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x**2) + eps) * weight``, computed in fp32, returned in ``x.dtype``.

    Args:
        dim: size of the last axis.
        eps: added to the mean square (DeepSeek-V3: 1e-6).

    Shapes: ``x`` (..., dim) -> (..., dim).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel; same fp32 arithmetic as x * rsqrt(mean(x^2) + eps) * weight
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # no casts to dispatch
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)
