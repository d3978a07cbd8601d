#!/usr/bin/env bash
# Training started by Hugging Face Accelerate's `accelerate launch`, used only to start the
# processes: dsv3 sets up its own process group (gloo on CPU, NCCL on GPU) and DeepSpeed engine,
# and accelerate's mixed precision / DeepSpeed / FSDP settings (an `accelerate config` file
# included) do not apply: set those in the dsv3 config.
# NPROC processes per node (default: GPUs present, or 1 on CPU). Two or more go through
# accelerate's --multi_gpu mode (torch.distributed.run underneath; despite the name it also
# starts CPU processes); accelerate's --cpu mode would start a single process without mpirun.
# Extra arguments go to `dsv3 train`, e.g.
#   launch/accelerate.sh --config configs/tiny.yaml train.steps=100
#   NPROC=2 launch/accelerate.sh parallel.micro_batch_size=4
# Several nodes: run it on every node with NNODES=N NODE_RANK=0..N-1 MASTER_ADDR=<node 0>
# [MASTER_PORT=29500] (passed on as --num_machines, --machine_rank, --main_process_ip/port).
# A failed run exits with 1; the processes' own exit codes are in their error lines / summary.
set -euo pipefail
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 1)")
fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "dsv3: error: NPROC=$NPROC is not a process count; set NPROC to 1 or more" >&2
  exit 2
fi
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  # CPU: split the cores between the processes (accelerate hands OMP_NUM_THREADS on)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
fi
NNODES=${NNODES:-1}
total=$(( NPROC * NNODES ))
# --quiet: a failed single process ends with its own error line and no launcher traceback
args=(--num_processes "$total" --num_machines "$NNODES" --mixed_precision no --dynamo_backend no --quiet)
if [ "$total" -gt 1 ]; then
  args+=(--multi_gpu)
fi
if [ "$NNODES" -gt 1 ]; then
  args+=(--machine_rank "${NODE_RANK:?set NODE_RANK (0..NNODES-1) on each node}"
         --main_process_ip "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
         --main_process_port "${MASTER_PORT:-29500}")
else
  args+=(--main_process_port 0)  # 0: a free port
fi
# a bad config or impossible layout: one error line and exit code 2 before any process starts
python -m dsv3 train --check "$total" "$@" > /dev/null
exec accelerate launch "${args[@]}" --module dsv3 train "$@"
