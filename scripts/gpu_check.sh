#!/usr/bin/env bash
# Every GPU check on a lent H100/H200 machine: the test suite's CUDA cases (`pytest -m cuda`:
# tests/test_cuda.py and every `device` case on CUDA), then the GPU section of the benchmark
# (`python -m bench gpu`: figures against their goals). No network: torch/timm/torchvision
# installed, DALI/kornia/webdataset (and pytest pluggy iniconfig, if missing) from the wheels in
# .gpuwheels/ (made on the dev machine by ../shared/gpu/prepare.sh).
#
# From the repository root, with .gpuwheels carried to the machine:
#   scripts/gpu_check.sh                          # the tests, then the full GPU section
#   scripts/gpu_check.sh --iters 2 --repeats 2    # a shorter GPU section
# Environment:
#   OUT=DIR         where gpu.json / gpu.txt go (the device tool sets $OUT)
#   SHARDS=DIR      existing shards to read (skips the conversion)
#   CORPUS=PATH     images folder or manifest (csv) to convert instead of the bundled sample
#   PYTHON=python3  the interpreter that has torch
# Any further arguments go to `python -m bench gpu` (e.g. --batch-size 128 --model resnet18).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-runs/gpu-check}

# 1. DALI, kornia, webdataset (and their needs) from the carried wheels into /tmp/site
if [ ! -d /tmp/site/nvidia/dali ]; then
  rm -rf /tmp/w
  cat .gpuwheels/part-* | tar -C /tmp -xf - --one-top-level=w
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/w/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# 2. shards: given, or converted from the carried corpus / the bundled sample (the benchmark
#    lists a small set several times over, so the 320-image sample is enough)
if [ -z "${SHARDS:-}" ]; then
  SHARDS=/tmp/gpucheck_shards
  INPUT=${CORPUS:-ecomaug/assets/sample/items.csv}
  if [ ! -f "$SHARDS/manifest.json" ]; then
    "$PYTHON" -c "import os, sys; from loaders.convert import convert_to_shards; \
convert_to_shards(sys.argv[1], sys.argv[2], shard_size=64 if sys.argv[1].endswith('items.csv') else 1000, \
workers=min(16, os.cpu_count() or 1), progress=False)" "$INPUT" "$SHARDS"
  fi
fi

# 3. the CUDA tests, then the GPU section; the exit code is the first failure's (both run)
status=0
"$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests || status=$?
"$PYTHON" -m bench gpu --shards "$SHARDS" --out "$OUT" --device cuda "$@" || status=$((status ? status : $?))
exit "$status"
