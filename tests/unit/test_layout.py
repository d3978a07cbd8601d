"""Every check of a parallel layout (dsv3/parallel/layout.py), in process: the ones ``dsv3 train
--check WORLD`` and the trainer run before any process group exists."""

import pytest
from helpers import ROOT

from dsv3.config import load_config
from dsv3.errors import DsvError
from dsv3.parallel.layout import check_expert_parallel, check_launch, check_pipeline


def test_stage_split_checks():
    def cfg(**kw):
        return load_config(None, [f"{k}={v}" for k, v in {"model.n_layers": 4, **kw}.items()])

    assert check_pipeline(cfg(**{"parallel.pp": 2}), 4) is None  # by parameter count, decided later
    assert check_pipeline(cfg(**{"parallel.pp": 2, "parallel.pp_partition": "3,1"}), 2) == [3, 1]
    with pytest.raises(DsvError, match=r"parallel.pp=5 stages but the model has only model.n_layers=4 blocks"):
        check_pipeline(cfg(**{"parallel.pp": 5}), 5)
    with pytest.raises(DsvError, match=r"parallel.pp_partition='2,1' must be .* sum to model.n_layers=4 \(e.g. 2,2\)"):
        check_pipeline(cfg(**{"parallel.pp": 2, "parallel.pp_partition": "2,1"}), 2)
    with pytest.raises(DsvError, match=r"parallel.pp=2 does not divide the 3 process\(es\)"):
        check_pipeline(cfg(**{"parallel.pp": 2}), 3)
    with pytest.raises(DsvError, match=r"data.document_aware=true is not available with pipeline parallelism"):
        check_pipeline(cfg(**{"parallel.pp": 2, "data.document_aware": True}), 2)


def test_pipeline_with_ep_and_zero1_needs_a_moe_block_on_every_stage():
    """DeepSpeed's ZeRO optimizer reduces one gradient norm per optimizer group over the stages; a
    stage without MoE layers has no expert group and the run would hang: refused up front."""

    def check(*extra):
        return check_launch(load_config(None, ["parallel.pp=2", "parallel.ep=2", "model.n_layers=4", *extra]), 4)

    with pytest.raises(
        DsvError,
        match=r"pipeline stage 0 holds only dense blocks \(0-0\), but with parallel.ep=2 and "
        r"ZeRO stage 1 every stage needs a MoE block .*; set "
        r"parallel.pp_partition=2,2 or parallel.zero_stage=0$",
    ):
        check("parallel.zero_stage=1", "parallel.pp_partition=1,3")
    with pytest.raises(DsvError, match=r"blocks \(0-0\).*; set parallel.zero_stage=0$"):  # no split leaves MoE on both
        check("parallel.zero_stage=1", "model.n_layers=2")
    assert check("parallel.zero_stage=1") is None  # split by parameters: blocks 0-2 and 3
    assert check("parallel.zero_stage=1", "parallel.pp_partition=2,2") == [2, 2]
    assert check("parallel.zero_stage=0", "parallel.pp_partition=1,3") == [1, 3]


def test_check_launch_accepts_ep():
    check_launch(load_config(None, ["parallel.ep=2"]), 2)
    with pytest.raises(DsvError, match="zero_stage=3"):
        check_launch(load_config(None, ["parallel.ep=2", "parallel.zero_stage=3"]), 2)


def test_layout_messages_name_the_data_parallel_size_and_working_ep_values():
    with pytest.raises(
        DsvError,
        match=r"^parallel.ep=4 does not divide the 2 process\(es\); run a multiple of 4 "
        r"processes or choose ep in \[1, 2\]$",
    ):
        check_expert_parallel(4, 8, 2)
    # 2 processes, pp=2: the data-parallel size is 1, so ep=2 needs 4 processes
    with pytest.raises(
        DsvError,
        match=r"^parallel.ep=2 does not divide the data-parallel size 1 \(2 processes / "
        r"parallel.pp=2\); run a multiple of 4 processes or choose ep in \[1\]$",
    ):
        check_expert_parallel(2, 8, 1, pp=2)
    with pytest.raises(DsvError, match=r"n_routed_experts=8 is not divisible by parallel.ep=3; choose ep in \[1, 2\]$"):
        check_expert_parallel(3, 8, 6)
    check_expert_parallel(2, 8, 6)


def test_zero3_and_offload_layouts():
    """ZeRO-3 runs without EP and pipelines; offload needs ZeRO (nvme and parameters: ZeRO-3)."""

    def check(world, *extra):
        return check_launch(load_config(None, list(extra)), world)

    assert check(2, "parallel.zero_stage=3") is None
    assert check(2, "parallel.zero_stage=1", "parallel.ep=2", "parallel.offload_optimizer=cpu") is None
    assert check(2, "parallel.zero_stage=1", "parallel.pp=2", "parallel.offload_optimizer=cpu") is None
    refused = [
        (
            ["parallel.zero_stage=3", "parallel.ep=2"],
            r"^parallel.zero_stage=3 is not available with expert parallelism \(parallel.ep=2\): ZeRO-3 would "
            r"gather every expert on every rank; use zero_stage 1 or 2 with ep, or ep=1 with zero_stage 3$",
        ),
        (
            ["parallel.zero_stage=3", "parallel.pp=2"],
            r"^parallel.zero_stage=3 is not available with pipeline parallelism \(parallel.pp=2\): DeepSpeed "
            r"pipelines support ZeRO stage 0 or 1 only; use zero_stage 1 with pp, or pp=1 with zero_stage 3$",
        ),
        (
            ["parallel.offload_optimizer=cpu"],
            r"^parallel.offload_optimizer=cpu needs ZeRO \(parallel.zero_stage=0 keeps everything on each "
            r"rank\); set zero_stage to 1, 2 or 3$",
        ),
        (
            ["parallel.zero_stage=2", "parallel.offload_param=cpu"],
            r"^parallel.offload_param=cpu needs parallel.zero_stage=3 \(ZeRO-2 keeps every weight on each "
            r"rank\); set zero_stage=3 or offload_param=none$",
        ),
        (
            ["parallel.zero_stage=1", "parallel.offload_optimizer=nvme", "parallel.offload_dir=/tmp/x"],
            r"^parallel.offload_optimizer=nvme needs parallel.zero_stage=3 \(DeepSpeed's ZeRO-1 keeps an "
            r"nvme-offloaded optimizer state in CPU memory\); set zero_stage=3, or offload_optimizer=cpu$",
        ),
    ]
    for extra, message in refused:
        with pytest.raises(DsvError, match=message):
            check(2, *extra)
    with pytest.raises(DsvError, match=r"^parallel.offload_param=nvme needs parallel.offload_dir, the folder"):
        load_config(None, ["parallel.zero_stage=3", "parallel.offload_param=nvme"])
    with pytest.raises(DsvError, match=r"^parallel.offload_optimizer='disk' must be none, cpu or nvme$"):
        load_config(None, ["parallel.offload_optimizer=disk"])


def test_parameter_swapping_to_nvme_is_refused_beyond_the_host_limit():
    """offload_param=nvme swaps parameters only beyond 1e9 elements per process; that is refused."""
    from dsv3.parallel.layout import check_async_io

    try:
        check_async_io()
    except DsvError as exc:
        pytest.skip(str(exc))
    cfg = load_config(str(ROOT / "configs" / "offload_2b.yaml"), ["parallel.offload_param=nvme"])
    with pytest.raises(DsvError, match=r"offload_param=nvme would swap parameters to nvme \(1,768,451,712 elements"):
        check_launch(cfg, 1)
    check_launch(cfg, 2)  # 884,225,856 elements per process: kept in host memory
    check_launch(load_config(str(ROOT / "configs" / "offload_2b.yaml"), []), 1)  # the config as shipped
