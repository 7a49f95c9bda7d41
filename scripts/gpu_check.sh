#!/usr/bin/env bash
# Run every GPU check (bench/gpu_check.py) on a lent H100/H200 machine: no network, torch/timm/
# torchvision installed, DALI/kornia/webdataset from the wheels in .gpuwheels/ (made on the dev
# machine by ../shared/gpu/prepare.sh; pass it `pytest pluggy iniconfig` too if the GPU machine
# has no pytest, or check 8 reports "skipped: pytest not installed").
#
# From the repository root, with .gpuwheels carried to the machine:
#   scripts/gpu_check.sh              # the full run (about 5 minutes on an H100)
#   scripts/gpu_check.sh --quick      # a smoke run of every check (about 2 minutes)
# Environment:
#   OUT=DIR         where gpu_check.json / gpu_check.txt go (the device tool sets $OUT)
#   SHARDS=DIR      existing shards to read (skips the conversion)
#   CORPUS=PATH     images folder or manifest (csv) to convert instead of the bundled sample
#   PYTHON=python3  the interpreter that has torch
# Any further arguments go to `python -m bench.gpu_check` (e.g. --only dali-loader,loader-fed).
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

# 2. shards: given, or converted from the carried corpus / the bundled sample (bench.gpu_check
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

# 3. the checks; exit code 1 when any check fails (the table and JSON are written either way)
"$PYTHON" -m bench.gpu_check --shards "$SHARDS" --out "$OUT" --device cuda "$@"
