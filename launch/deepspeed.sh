#!/usr/bin/env bash
# Single-node training with the DeepSpeed launcher. NPROC processes (default: GPUs present,
# or 1 on CPU). Extra arguments go to `dsv3 train`, e.g.
#   launch/deepspeed.sh --config configs/tiny.yaml parallel.zero_stage=1
# Several nodes: pass a hostfile (see launch/hostfile.example) with DS_HOSTFILE=path.
set -euo pipefail
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 1)")
fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "dsv3: error: NPROC=$NPROC is not a process count; set NPROC to 1 or more" >&2
  exit 2
fi
args=(--num_gpus "$NPROC")
world=$NPROC
if [ -n "${DS_HOSTFILE:-}" ]; then
  args=(--hostfile "$DS_HOSTFILE")
  # every "host slots=N" line of the hostfile starts N processes
  world=$(awk '!/^[[:space:]]*#/ { for (i = 1; i <= NF; i++) if ($i ~ /^slots=/) { split($i, kv, "="); n += kv[2] } }
               END { print n + 0 }' "$DS_HOSTFILE")
fi
# a bad config or impossible layout: one error line and exit code 2 before any process starts
python -m dsv3 train --check "$world" "$@" > /dev/null
# --no_local_rank: the rank reaches dsv3 through $LOCAL_RANK, not an extra argument
exec deepspeed "${args[@]}" --no_local_rank --module dsv3 train "$@"
