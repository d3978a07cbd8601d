#!/usr/bin/env bash
# The benchmarks on one CUDA GPU, bf16: experts through torch._grouped_mm (compute capability
# >= 9.0), attention through scaled_dot_product_attention (flash / memory-efficient kernels),
# fp32 master weights in AdamW. Writes bench/*.json and prints the tables (MFU against the
# measured bf16 matmul peak, tokens/s, peak memory per micro-batch).
#   bench/gpu.sh                      # every step below, most wanted first
#   bench/gpu.sh [KEY=VALUE ...]      # overrides go to every bench command (not the DeepSpeed run)
#   bench/gpu.sh --config CFG [KEY=VALUE ...]   # only the bench suite of one config
#   bench/gpu.sh --dry-run [...]      # print the commands, run nothing (no GPU needed)
# Steps, in this order: the CUDA-only tests; configs/bench.yaml trained against transformers;
# the ~1B-activated configs/bench_1b.yaml trained; decoding of bench.yaml against transformers,
# eager and with CUDA graphs; a short training run of tiny through DeepSpeed (NCCL) and decoding
# from its checkpoint; decoding of bench_1b.yaml; last the torch.compile runs (their compilation
# takes minutes).
# Time: every step runs under `timeout` (STEP_S, default 300 s); once BUDGET_S (default 540 s)
# have passed since the start, the steps left are skipped and named, and the step running then
# is stopped 50 s after it at the latest, so that a short GPU allocation returns the
# most wanted figures first. A step that fails or times out is
# reported and the others still run; the exit status is 1 if any failed.
# Results: where OUT names a folder (e.g. a job's output folder), gpu.log (everything printed)
# and gpu-results.tar.gz (every result JSON written so far) are kept there up to date after
# each step, so that a run cut short still hands back what it measured.
# Expects a CUDA PyTorch image with transformers, sentencepiece, tensorboard, psutil, einops,
# msgpack, xxhash and pytest; DeepSpeed and datasets may come from .whl/ (bench/offline_wheels.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}" PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
step_s="${STEP_S:-300}"
budget_s="${BUDGET_S:-540}"
usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() {
  echo "bench/gpu.sh: $*" >&2
  exit 2
}
for v in STEP_S BUDGET_S; do
  [[ "${!v:-1}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a whole number of seconds (got '${!v}')"
done
dry=0
args=()
while (($#)); do
  case "$1" in
    --dry-run) dry=1 ;;
    -h | --help) usage; exit 0 ;;
    --config | --config=*)
      if [[ "$1" == --config ]]; then
        (($# > 1)) || die "--config needs a config file, e.g. --config configs/bench.yaml"
        cfg="$2"
        shift
      else
        cfg="${1#--config=}"
      fi
      [[ -f "$cfg" ]] || die "no config file $cfg (the configs are in configs/)"
      args+=(--config "$cfg") ;;
    *=*) args+=("$1") ;;
    *) die "unknown argument $1 (takes --config CFG, KEY=VALUE overrides, --dry-run, --help)" ;;
  esac
  shift
done
set -- "${args[@]+"${args[@]}"}"
out="${OUT:-}"
if ((!dry)) && [[ -n "$out" ]]; then
  mkdir -p "$out"
  exec > >(tee -a "$out/gpu.log") 2>&1
  tee_pid=$!
  trap 'exec >&- 2>&-; wait "$tee_pid"' EXIT  # the log complete before the script returns
fi
if ((!dry)); then
  "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh: no CUDA GPU visible")' || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' || true
fi
start=$SECONDS
mark="$(mktemp)"  # result files newer than this one are this run's
failed=()
skipped=()
collect() {  # this run's results into $OUT/gpu-results.tar.gz (replaced whole, never half-written)
  [[ -n "$out" ]] || return 0
  local files
  mapfile -t files < <(find bench runs/gpu-tiny -maxdepth 1 -newer "$mark" \( -name '*.json' -o -name 'metrics.jsonl' \) 2>/dev/null)
  ((${#files[@]})) || return 0
  tar czf "$out/.gpu-results.tar.gz" "${files[@]}" && mv "$out/.gpu-results.tar.gz" "$out/gpu-results.tar.gz"
}
run() {
  if ((dry)); then
    printf '%q ' "$@"
    echo
    return 0
  fi
  if ((SECONDS - start >= budget_s)); then
    skipped+=("$*")
    return 0
  fi
  local limit=$((budget_s + 50 - (SECONDS - start)))  # every step over 50 s after the budget at the latest
  ((limit < step_s)) || limit=$step_s
  echo "== $* ($((SECONDS - start)) s)"
  timeout -k 10 "$limit" "$@"
  local rc=$?
  ((rc == 0)) || failed+=("$* (exit $rc$( ((rc == 124 || rc == 137)) && echo ", over ${limit} s"))")
  collect
}
dsv3=("$python" -m dsv3)
if [[ " $* " == *" --config "* ]]; then
  run "${dsv3[@]}" bench train --precision bf16 --vs hf --steps 10 --reps 3 "$@"
  run "${dsv3[@]}" bench decode --precision bf16 --vs hf "$@"
  run "${dsv3[@]}" bench decode --precision bf16 --cuda-graph --vs hf "$@"
  run "${dsv3[@]}" bench train --precision bf16 --compile --steps 10 --reps 3 "$@"
  run "${dsv3[@]}" bench decode --precision bf16 --compile "$@"
else
  # CUDA graph capture against the eager fixed-shape step (skipped on a machine without CUDA)
  run "$python" -m pytest -q -p no:cacheprovider tests/unit/test_graph_decode.py
  bench=(--config configs/bench.yaml --precision bf16)
  big=(--config configs/bench_1b.yaml --precision bf16)
  run "${dsv3[@]}" bench train "${bench[@]}" --vs hf --steps 10 --reps 3 "$@"
  # the ~1B-activated config: no transformers peer in training (a second model and optimizer
  # of this size would not fit beside dsv3's), which bench train leaves out by itself anyway
  run "${dsv3[@]}" bench train "${big[@]}" --steps 5 --reps 2 "$@"
  run "${dsv3[@]}" bench decode "${bench[@]}" --vs hf "$@"
  run "${dsv3[@]}" bench decode "${bench[@]}" --cuda-graph --vs hf "$@"
  # training through DeepSpeed on the GPU (NCCL), a checkpoint, and decoding from it with and
  # without CUDA graphs; needs deepspeed and datasets: from .whl/ (bench/offline_wheels.sh)
  # where the machine has neither and no package index
  if ((!dry)) && ! "$python" -c 'import deepspeed, datasets' 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/dsv3-site .whl/*.whl \
      && export PYTHONPATH="/tmp/dsv3-site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if ((dry)) || "$python" -c 'import deepspeed, datasets'; then  # (its error, if any, says what is missing)
    tiny=runs/gpu-tiny
    ((dry)) || rm -rf "$tiny"
    run "${dsv3[@]}" train --config configs/tiny.yaml train.steps=100 train.eval_every=50 \
      train.precision=bf16 "train.out_dir=$tiny"
    run "${dsv3[@]}" generate --ckpt "$tiny" --prompt "def " --temperature 0 --max-new-tokens 48
    run "${dsv3[@]}" generate --ckpt "$tiny" --prompt "def " --temperature 0 --max-new-tokens 48 --cuda-graph
  else
    echo "skipped: dsv3 train on the GPU needs deepspeed and datasets (bench/offline_wheels.sh fills .whl/)"
  fi
  run "${dsv3[@]}" bench decode "${big[@]}" --vs hf --reps 2 "$@"
  run "${dsv3[@]}" bench decode "${big[@]}" --cuda-graph --reps 2 "$@"
  run "${dsv3[@]}" bench train "${bench[@]}" --compile --steps 10 --reps 3 "$@"
  run "${dsv3[@]}" bench decode "${bench[@]}" --compile "$@"
fi
rm -f "$mark"
if ((${#skipped[@]})); then
  echo "SKIPPED (${budget_s} s had passed):"
  printf '  %s\n' "${skipped[@]}"
fi
if ((${#failed[@]})); then
  echo "FAILED:"
  printf '  %s\n' "${failed[@]}"
  exit 1
fi
