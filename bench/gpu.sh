#!/usr/bin/env bash
# The benchmarks on one CUDA GPU, bf16: experts through torch._grouped_mm (compute capability
# >= 9.0), attention through scaled_dot_product_attention (flash / memory-efficient kernels),
# fp32 master weights in AdamW. Writes bench/*.json and prints the tables (MFU against the
# measured bf16 matmul peak, tokens/s, peak memory per micro-batch).
#   bench/gpu.sh                      # the CUDA-only tests, a short training run and decoding from it,
#                                     # configs/bench.yaml, then configs/bench_1b.yaml
#   bench/gpu.sh --config CFG [KEY=VALUE ...]
# A step that fails is reported and the others still run; the exit status is 1 if any failed.
# Expects a CUDA PyTorch image with transformers, sentencepiece, tensorboard, psutil, einops,
# msgpack, xxhash and pytest; DeepSpeed and datasets may come from .whl/ (bench/offline_wheels.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}" PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
"$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh: no CUDA GPU visible")' || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
failed=()
run() {
  echo "== $*"
  "$@" || failed+=("$*")
}
suite() {  # train (against transformers, then compiled) and decode (eager, CUDA graph, compiled) of one config
  run "$python" -m dsv3 bench train --precision bf16 --vs hf --steps 10 --reps 3 "$@"
  run "$python" -m dsv3 bench train --precision bf16 --compile --steps 10 --reps 3 "$@"
  run "$python" -m dsv3 bench decode --precision bf16 --vs hf "$@"
  run "$python" -m dsv3 bench decode --precision bf16 --cuda-graph --vs hf "$@"
  run "$python" -m dsv3 bench decode --precision bf16 --compile "$@"
}
if [[ " $* " == *" --config "* || " $* " == *" --config="* ]]; then
  suite "$@"
else
  # CUDA graph capture against the eager fixed-shape step (skipped on a machine without CUDA)
  run "$python" -m pytest -q -p no:cacheprovider tests/unit/test_graph_decode.py
  # training through DeepSpeed on the GPU (NCCL), a checkpoint, and decoding from it with and
  # without CUDA graphs; needs deepspeed and datasets: from .whl/ (bench/offline_wheels.sh)
  # where the machine has neither and no package index
  if ! "$python" -c 'import deepspeed, datasets' 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/dsv3-site .whl/*.whl \
      && export PYTHONPATH="/tmp/dsv3-site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if "$python" -c 'import deepspeed, datasets'; then  # (its error, if any, says what is missing)
    out=runs/gpu-tiny
    rm -rf "$out"
    run "$python" -m dsv3 train --config configs/tiny.yaml train.steps=100 train.eval_every=50 \
      train.precision=bf16 "train.out_dir=$out"
    run "$python" -m dsv3 generate --ckpt "$out" --prompt "def " --temperature 0 --max-new-tokens 48
    run "$python" -m dsv3 generate --ckpt "$out" --prompt "def " --temperature 0 --max-new-tokens 48 --cuda-graph
  else
    echo "skipped: dsv3 train on the GPU needs deepspeed and datasets (bench/offline_wheels.sh fills .whl/)"
  fi
  suite --config configs/bench.yaml "$@"
  # the ~1B-activated config: no transformers peer in training (a second model and optimizer
  # of this size would not fit beside dsv3's), which bench train leaves out by itself anyway
  run "$python" -m dsv3 bench train --config configs/bench_1b.yaml --precision bf16 --steps 5 --reps 2 "$@"
  run "$python" -m dsv3 bench decode --config configs/bench_1b.yaml --precision bf16 --vs hf --reps 2 "$@"
  run "$python" -m dsv3 bench decode --config configs/bench_1b.yaml --precision bf16 --cuda-graph --reps 2 "$@"
fi
if ((${#failed[@]})); then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
