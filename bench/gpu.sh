#!/usr/bin/env bash
# The benchmarks on one CUDA GPU, bf16: experts through torch._grouped_mm (compute capability
# >= 9.0), attention through scaled_dot_product_attention (flash / memory-efficient kernels),
# fp32 master weights in AdamW. Writes bench/*.json and prints the tables (MFU against the
# measured bf16 matmul peak, tokens/s, peak memory per micro-batch).
#   bench/gpu.sh                      # configs/bench.yaml
#   bench/gpu.sh --config CFG [KEY=VALUE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh: no CUDA GPU visible")'
args=("$@")
[[ " ${args[*]-} " == *" --config "* ]] || args=(--config configs/bench.yaml "${args[@]}")
python -m dsv3 bench train --precision bf16 --vs hf --steps 10 --reps 3 "${args[@]}"
python -m dsv3 bench train --precision bf16 --compile --steps 10 --reps 3 "${args[@]}"
python -m dsv3 bench decode --precision bf16 --vs hf "${args[@]}"
python -m dsv3 bench decode --precision bf16 --compile --vs hf "${args[@]}"
