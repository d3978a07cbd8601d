"""Run metrics: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard scalars."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from dsv3.fileio import atomic_write_text

# metrics.jsonl key -> TensorBoard tag (grouped so the dashboard reads well)
TB_TAGS = {
    "loss": "loss/total",
    "lm_loss": "loss/lm",
    "mtp_loss": "loss/mtp",
    "balance_loss": "loss/balance",
    "val_loss": "loss/val",
    "lr": "optim/lr",
    "global_batch": "schedule/global_batch",
    "mtp_lambda": "schedule/mtp_lambda",
    "bias_update_speed": "schedule/bias_update_speed",
    "grad_norm": "optim/grad_norm",
    "tokens_per_s": "perf/tokens_per_s",
    "step_time_s": "perf/step_time_s",
    "data_share": "perf/data_loading_share",
    "tflops": "perf/model_tflops",
    "mfu": "perf/mfu",
    "peak_mem_mib": "perf/peak_memory_mib",
    "tokens": "progress/tokens",
    "expert_load_max_over_mean": "moe/load_max_over_mean",
}


class MetricsLogger:
    """Writes metrics on rank 0; a no-op object on other ranks.

    On resume from step k, records with ``step > k`` left by the interrupted run are
    dropped from ``metrics.jsonl`` and TensorBoard is opened with ``purge_step=k+1``, so the
    logs continue at k+1 without duplicate or stale points.
    """

    def __init__(self, out_dir: Path, start_step: int, enabled: bool, config_text: str | None = None):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= start_step
            ]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1 if start_step > 0 else None)
        if config_text and start_step == 0:
            self.writer.add_text("config", "```\n" + config_text + "\n```", 0)

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` (must hold ``step``) to metrics.jsonl and TensorBoard.

        Keys containing "/" (per-layer expert load, ``expert_load/layer3``) go to TensorBoard only.
        """
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({k: v for k, v in record.items() if "/" not in k}) + "\n")
        step = record["step"]
        for key, value in record.items():
            if key in TB_TAGS and value is not None:
                self.writer.add_scalar(TB_TAGS[key], value, step)
            elif key.startswith("expert_load/"):
                self.writer.add_scalar("moe/" + key.split("/", 1)[1], value, step)
        self.writer.flush()

    def log_expert_load(self, step: int, load, bias) -> None:
        """Per MoE layer: a histogram of the tokens each expert received in the step, and the
        spread (max - min) of the load-balancing bias, in TensorBoard.

        Args:
            load: (L_moe, E) tokens per expert over the global batch.
            bias: (L_moe, E) ``e_score_correction_bias`` after the update.
        """
        if self.writer is None:
            return
        for i, (row, b) in enumerate(zip(load, bias)):
            self.writer.add_histogram(f"moe_load/layer{i}", row.float(), step)
            self.writer.add_scalar(f"moe_bias_spread/layer{i}", float(b.max() - b.min()), step)

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """Record the run's hyper-parameters with final metrics in TensorBoard's HParams tab."""
        if self.writer is not None:
            flat = {k: v for k, v in hparams.items() if isinstance(v, (int, float, str, bool))}
            self.writer.add_hparams(flat, metrics, run_name=".")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Console:
    """Rank 0's terminal output: a progress bar (loss, tokens/s, ETA) in an interactive
    terminal; plain periodic lines when stdout is not a TTY (SLURM logs, pipes)."""

    def __init__(self, enabled: bool, start: int, total: int):
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stdout)

    def write(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def step(self, rec: dict[str, Any], total: int, line_due: bool) -> None:
        """Advance by one step; print a log line when ``line_due`` (always for validation)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
            if "val_loss" in rec:
                self.bar.write(f"step {rec['step']}/{total} | val_loss {rec['val_loss']:.4f}")
            return
        if line_due:
            extra = f" | val_loss {rec['val_loss']:.4f}" if "val_loss" in rec else ""
            print(
                f"step {rec['step']}/{total} | loss {rec['loss']:.4f} | lm {rec['lm_loss']:.4f} | "
                f"mtp {rec['mtp_loss']:.4f} | lr {rec['lr']:.2e} | grad_norm {rec['grad_norm']:.3f} | "
                f"{rec['tokens_per_s']:.0f} tok/s{extra}",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def step_record(
    lm: float,
    mtp: float,
    balance: float,
    mtp_lambda: float,
    alpha: float,
    lr: float,
    grad_norm,
    finite: bool,
    load: torch.Tensor | None,
) -> dict[str, float]:
    """The metrics of one optimizer step, as logged to ``metrics.jsonl`` and TensorBoard.

    Args:
        lm, mtp, balance: global-batch means of the LM loss, the MTP loss (mean over depths)
            and the balance loss (V3 report eq. 17-20, 25).
        mtp_lambda, alpha: their weights in the total ``loss``.
        lr: learning rate of the step.
        grad_norm: global gradient norm (tensor or float; None -> NaN).
        finite: False if the update was skipped (non-finite loss or gradient).
        load: (L_moe, E) tokens routed to each expert of each MoE layer over the global
            batch, or None.

    Returns:
        ``loss``, ``lm_loss``, ``mtp_loss``, ``balance_loss``, ``lr``, ``grad_norm``, ``skipped``
        (only when skipped), and per-layer ``expert_load/layer{i}`` = max/mean load with their
        mean ``expert_load_max_over_mean``.
    """
    rec = {
        "loss": lm + mtp_lambda * mtp + alpha * balance,
        "lm_loss": lm,
        "mtp_loss": mtp,
        "balance_loss": balance,
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
    }
    if not finite:
        rec["skipped"] = True
    if load is not None and load.numel():
        lf = load.float()
        ratio = lf.max(-1).values / lf.mean(-1).clamp(min=1e-9)
        rec["expert_load_max_over_mean"] = ratio.mean().item()
        for i, r in enumerate(ratio.tolist()):
            rec[f"expert_load/layer{i}"] = r
    return rec


def perf_record(
    cfg, tokens_per_s: float, data_time: float, step_time: float, peak_tflops: float | None, world_size: int, device
) -> dict[str, float]:
    """Throughput extras of one step: model TFLOP/s (and MFU when a peak is known: TFLOP/s per
    process), the share of the step spent loading data, and peak memory of this process (MiB:
    ``max_memory_allocated`` on CUDA, the peak resident set on CPU)."""
    import resource

    import torch

    from dsv3.model import flops_per_token

    achieved = flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_s / 1e12
    out = {"tflops": achieved, "data_share": data_time / max(step_time, 1e-9)}
    if peak_tflops:
        out["mfu"] = achieved / (peak_tflops * world_size)
    if device.type == "cuda":
        out["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_mem_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out
