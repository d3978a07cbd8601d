"""RMSNorm (Zhang & Sennrich, 2019), used before attention, FFN, the head and inside MLA."""

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model.decode import PACK_MAX_ROWS, derived, fast_inference


class _RMSNormFunction(torch.autograd.Function):
    """``y = x * rsqrt(mean(x^2) + eps) * w`` in fp32 with a written-out backward.

    The same fp32 forward arithmetic as ``F.rms_norm`` (whose forward and backward run as a dozen
    separate elementwise passes on CPU), keeping only ``x`` (its own dtype) and the (..., 1) fp32
    ``rsqrt``. With ``xhat = x r`` and ``gy = g w``: ``dw = sum over rows of g xhat`` and
    ``dx = r (gy - xhat mean(gy xhat))``. Forward + backward of (4, 512, 512) bf16 on one CPU
    thread: 1.8 ms against 4.0 ms.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # noqa: D102
        ct = torch.promote_types(x.dtype, torch.float32)  # fp32 (fp64 stays fp64)
        xc = x.to(ct, copy=True)
        r = torch.rsqrt(xc.square().mean(-1, keepdim=True).add_(eps))  # (..., 1)
        y = xc.mul_(r).mul_(weight.to(ct))
        ctx.save_for_backward(x, weight, r)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # noqa: D102
        x, weight, r = ctx.saved_tensors
        xhat = x.to(r.dtype).mul(r)
        gc = g.to(r.dtype)
        dw = (gc * xhat).sum(dim=tuple(range(g.dim() - 1))) if ctx.needs_input_grad[1] else None
        gy = gc.mul(weight.to(r.dtype))
        dx = gy.sub_(xhat.mul_((gy * xhat).mean(-1, keepdim=True))).mul_(r) if ctx.needs_input_grad[0] else None
        return (
            None if dx is None else dx.to(x.dtype),
            None if dw is None else dw.to(weight.dtype),
            None,
        )


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
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        if x.device.type == "cpu" and x.numel() <= PACK_MAX_ROWS * x.shape[-1] and fast_inference(self):
            return self._mirrored(x)
        # inference: one fused kernel; same fp32 arithmetic as x * rsqrt(mean(x^2) + eps) * weight
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # no casts to dispatch
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)

    def _mirrored(self, x: torch.Tensor) -> torch.Tensor:
        """The norm of a few rows (a decoding step on CPU) as one ``layer_norm`` of ``[x, -x]``:
        that vector has mean 0 and variance ``mean(x^2)``, so its first half comes out as
        ``x * rsqrt(mean(x^2) + eps) * weight`` (to fp32 rounding: the mean is summed, not known
        to be 0), computed in fp32 and rounded once to ``x.dtype``, in two operators instead
        of the eight ``F.rms_norm`` runs as on CPU (one 256-wide row: 4.7 against 9.6 us)."""
        w = self.weight
        w2 = derived(self, "mirrored", (w,), lambda: torch.cat([w, w]))
        D = x.shape[-1]
        return torch.layer_norm(torch.cat([x, -x], dim=-1), (2 * D,), w2, None, self.eps, False)[..., :D]
