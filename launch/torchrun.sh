#!/usr/bin/env bash
# Single-node training with torchrun: one process per GPU, or NPROC processes on CPU (gloo).
# Extra arguments go to `dsv3 train`, e.g.
#   launch/torchrun.sh --config configs/tiny.yaml train.steps=100
#   NPROC=2 launch/torchrun.sh parallel.micro_batch_size=4
set -euo pipefail
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 1)")
fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "dsv3: error: NPROC=$NPROC is not a process count; set NPROC to 1 or more" >&2
  exit 2
fi
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  # CPU: split the cores between the processes
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
fi
# a bad config or impossible layout: one error line and exit code 2 before any process starts
python -m dsv3 train --check "$NPROC" "$@" > /dev/null
exec torchrun --standalone --nproc_per_node="$NPROC" -m dsv3 train "$@"
