"""dsv3 plan: counts and the static memory budget, checked against numbers worked out by hand."""

from pathlib import Path

import pytest
import torch

from dsv3.config import check_trainable, load_config
from dsv3.errors import DsvError
from dsv3.model import Transformer
from dsv3.plan import memory_per_gpu, plan, split_counts

ROOT = Path(__file__).resolve().parents[1]
V3 = ROOT / "configs" / "deepseek_v3_671b.yaml"


def test_671b_split_and_deepseek_layout_fits():
    cfg = load_config(V3, ["parallel.pp=16", "parallel.ep=64"])
    with torch.device("meta"):
        model = Transformer(cfg.model)
    experts, other = split_counts(model)
    assert experts == 58 * 256 * 3 * 7168 * 2048 == 653_908_770_816  # 58 MoE layers x 256 experts x SwiGLU
    assert experts + other == 671_026_404_352
    mem = memory_per_gpu(experts, other, gpus=2048, pp=16, ep=64, zero_stage=1)
    # per GPU: 1/16 of the non-expert weights, 1/(16*64) of the experts; dp = 128, expert dp = 2
    local = other / 16 + experts / 1024
    assert mem.weights == pytest.approx(2 * local)
    assert mem.grads == pytest.approx(2 * local)
    assert mem.optimizer == pytest.approx(12 * (other / 16 / 128 + experts / 1024 / 2))
    assert mem.total / 2**30 == pytest.approx(10.02, abs=0.01)
    text = plan(cfg, 2048, 80)
    assert "main 671,026,404,352" in text and "activated per token 37,552,282,624" in text
    assert "fits in 80 GiB" in text and "does NOT" not in text


def test_671b_without_model_parallelism_does_not_fit():
    text = plan(load_config(V3), 2048, 80)
    assert "does NOT fit in 80 GiB" in text


def test_bad_layouts():
    with pytest.raises(DsvError, match="not divisible by parallel.pp=16"):
        memory_per_gpu(10, 10, gpus=100, pp=16, ep=1, zero_stage=1)
    with pytest.raises(DsvError, match="multiple of pp\\*ep=8"):
        memory_per_gpu(10, 10, gpus=12, pp=2, ep=4, zero_stage=1)
    check_trainable(load_config(None, ["parallel.pp=2"]))  # pipelines train (ZeRO 0-1)
    with pytest.raises(DsvError, match="zero_stage=2 is not available with pipeline parallelism"):
        check_trainable(load_config(None, ["parallel.pp=2", "parallel.zero_stage=2"]))
