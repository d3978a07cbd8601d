#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with the wheels that a GPU machine without a package index needs to
# run all of bench/gpu.sh: DeepSpeed and datasets with their dependencies that are not in a CUDA
# PyTorch image with torch, transformers, numpy, pyarrow, pandas, sentencepiece, tensorboard,
# psutil, einops, msgpack, xxhash and pytest (what bench/gpu.sh expects there).
# Run on a machine that reaches PyPI; copy .whl/ along with the checkout; bench/gpu.sh installs
# them into a temporary folder when deepspeed or datasets cannot be imported.
#   bench/offline_wheels.sh [PYTHON_VERSION]      # the GPU machine's Python, default 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-3.12}"
mkdir -p .whl
rm -f .whl/*.whl  # (one Python version's wheels at a time: pip refuses the others)
# DeepSpeed publishes only a source distribution: build its wheel here (pure Python; its CPU and
# CUDA ops are compiled on first use on the target machine)
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 \
  || python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
platforms=()
for n in 2_17 2_27 2_28 2_31 2_34; do platforms+=(--platform "manylinux_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
ls -1 .whl
