"""What ``dsv3 bench train`` times: the two sides (dsv3 and the transformers peer), their
optimizers, and the activation memory of one micro-batch."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dsv3.config import Config
from dsv3.errors import DsvError
from dsv3.hardware import DTYPES
from dsv3.parallel.engine import adamw_kernel, param_groups

HF_EXPERTS = ("eager", "grouped_mm")  # "batched_mm" is far slower on CPU (85 tokens/s on tiny); opt in


# --------------------------------------------------------------------------- optimizer


class MasterWeightAdamW:
    """AdamW over fp32 master copies of low-precision (bf16) model parameters.

    ``step()`` casts each parameter's gradient to fp32 onto its master copy, runs torch AdamW
    (fp32 moments) on the masters, and writes the updated masters back into the bf16
    parameters. Gradients, moments and updates are fp32, so small updates accumulate in the
    master weights instead of vanishing in bf16 (mixed-precision training, Micikevicius et
    al. 2018; DeepSeek-V3 report §3.3 keeps fp32 master weights and moments too).

    Args:
        param_groups: torch-style groups of the model's (bf16) parameters.
        **adamw: torch.optim.AdamW keyword arguments (lr, betas, eps, weight_decay, ...).
    """

    def __init__(self, param_groups: list[dict[str, Any]], **adamw):
        self.model_params: list[torch.Tensor] = []
        self.master_params: list[torch.Tensor] = []
        groups = []
        for g in param_groups:
            masters = []
            for p in g["params"]:
                m = p.detach().float().clone()
                self.model_params.append(p)
                self.master_params.append(m)
                masters.append(m)
            groups.append({**g, "params": masters})
        self.optimizer = torch.optim.AdamW(groups, **adamw)
        self.param_groups = self.optimizer.param_groups

    @torch.no_grad()
    def step(self) -> None:
        """Update the masters with the model gradients, then copy them into the model."""
        src, dst = [], []
        for p, m in zip(self.model_params, self.master_params):
            if p.grad is None:
                m.grad = None
                continue
            if m.grad is None:
                m.grad = torch.empty_like(m)  # kept between steps: one fp32 buffer per parameter
            src.append(p.grad)
            dst.append(m.grad)
        if dst:
            torch._foreach_copy_(dst, src)  # bf16 -> fp32
        self.optimizer.step()
        torch._foreach_copy_(self.model_params, self.master_params)  # fp32 -> bf16 (round to nearest)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the model's gradients (the fp32 gradient buffers are reused)."""
        for p in self.model_params:
            p.grad = None


def make_optimizer(model: torch.nn.Module, cfg: Config, precision: str, master: bool):
    """torch AdamW (fp32 weights or pure low precision), or :class:`MasterWeightAdamW`; in the
    implementation :func:`dsv3.parallel.engine.adamw_kernel` picks, as ``dsv3 train`` does."""
    groups = param_groups(model, cfg.train.weight_decay)
    t = cfg.train
    kw = dict(lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, weight_decay=t.weight_decay)
    masters = precision != "fp32" and master
    kernel = adamw_kernel([p for g in groups for p in g["params"]], torch.float32 if masters else None)
    kw[kernel] = True
    if masters:
        return MasterWeightAdamW(groups, **kw)
    return torch.optim.AdamW(groups, **kw)


# --------------------------------------------------------------------------- sides


class Side:
    """One model + optimizer under test: ``step(batch)`` runs one full optimizer step."""

    def __init__(self, name: str, model: torch.nn.Module, optimizer, loss_fn: Callable, grad_clip: float):
        self.name, self.model, self.optimizer, self.loss_fn = name, model, optimizer, loss_fn
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grad_clip = grad_clip
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        """One optimizer step: :meth:`forward`, :meth:`backward`, :meth:`update`."""
        self.backward(self.forward(inputs, labels))
        self.update()

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of one (B, T) batch (scalar)."""
        return self.loss_fn(self.model, inputs, labels)

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss``."""
        loss.backward()

    def update(self) -> None:
        """Gradient clipping, the optimizer update, and dropping the gradients."""
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def dsv3_loss(cfg: Config):
    lam, alpha = cfg.train.mtp_lambda, cfg.train.balance_loss_alpha

    def loss(model, inputs, labels):
        return model(inputs, labels).local_loss(lam, alpha)

    return loss


def hf_loss(model, inputs, labels):
    return model(input_ids=inputs, labels=inputs).loss


def build_dsv3(
    cfg: Config,
    device: torch.device,
    precision: str,
    checkpointing: bool = False,
    compile_model: bool = False,
    seed: int = 0,
):
    """The dsv3 model in ``precision`` on ``device`` (routing biases and rope tables stay fp32)."""
    from dsv3.model import Transformer
    from dsv3.parallel.checkpointing import apply_activation_checkpointing

    model = Transformer(cfg.model)
    model.init_weights(seed=seed)
    model.to(device)
    if precision != "fp32":
        for p in model.parameters():
            p.data = p.data.to(DTYPES[precision])
    if checkpointing:
        apply_activation_checkpointing(model)
    model.train()
    if compile_model:
        model = torch.compile(model)
    return model


def build_hf(
    cfg: Config,
    state: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    experts: str = "grouped_mm",
    attn: str = "sdpa",
):
    """transformers' ``DeepseekV3ForCausalLM`` with the weights of a dsv3 state dict.

    The weights go through :func:`dsv3.checkpoint.export_hf` (a temporary folder), so the peer
    is exactly what a user importing the exported checkpoint gets.

    Raises:
        DsvError: transformers is not installed.
    """
    try:
        from transformers import DeepseekV3ForCausalLM
    except ImportError as err:  # pragma: no cover - transformers is a test dependency
        raise DsvError(f"--vs hf needs transformers ({err}); pip install transformers") from err
    import transformers
    from safetensors.torch import save_file

    from dsv3.checkpoint import export_hf
    from dsv3.config import save_config

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        ck = Path(tmp) / "ckpt"
        ck.mkdir()
        save_file({k: v.detach().float().contiguous().cpu() for k, v in state.items()}, str(ck / "model.safetensors"))
        save_config(Config(model=cfg.model), ck / "config.yaml")
        export_hf(ck, Path(tmp) / "hf")
        model = DeepseekV3ForCausalLM.from_pretrained(
            str(Path(tmp) / "hf"), attn_implementation=attn, experts_implementation=experts, dtype=torch.float32
        )
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.to(device)
    if dtype != torch.float32:
        model.to(dtype)
        for name, buf in model.named_buffers():  # routing bias stays fp32, as in dsv3
            if name.endswith("e_score_correction_bias"):
                buf.data = buf.data.float()
    return model.train()


def dsv3_state(cfg: Config, seed: int) -> dict[str, torch.Tensor]:
    from dsv3.model import Transformer

    m = Transformer(cfg.model)
    m.init_weights(seed=seed)
    return m.state_dict()


def hf_parity(cfg: Config, seed: int = 0) -> float:
    """Max |logits difference| between dsv3 and the transformers model built by the bench
    (fp32, eval mode, same weights, one random batch)."""
    state = dsv3_state(cfg, seed)
    ours = build_dsv3(cfg, torch.device("cpu"), "fp32", seed=seed).eval()
    hf = build_hf(cfg, state, torch.device("cpu"), torch.float32, experts="eager", attn="eager").eval()
    ids = torch.randint(
        0, cfg.model.vocab_size, (2, min(32, cfg.data.seq_len)), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        return (ours(ids) - hf(input_ids=ids).logits.float()).abs().max().item()


# --------------------------------------------------------------------------- memory


def activation_bytes(side: Side, inputs: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes of the distinct tensor storages autograd saves for backward in one forward.

    Parameters are excluded (they exist anyway); with activation checkpointing only the
    block inputs are saved, so the figure drops. Runs one forward and its backward.
    """
    params = {p.untyped_storage().data_ptr() for p in side.model.parameters()}
    seen: dict[int, int] = {}

    @torch.compiler.disable  # a compiled model calls it from its graphs: not traced (one graph per stride)
    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            try:
                s = t.untyped_storage()
            except RuntimeError:
                return t
            ptr = s.data_ptr()
            if ptr not in params:
                seen[ptr] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = side.loss_fn(side.model, inputs, labels)
    loss.backward()
    side.optimizer.zero_grad(set_to_none=True)
    return sum(seen.values())


def rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
