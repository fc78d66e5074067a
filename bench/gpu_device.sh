#!/usr/bin/env bash
# On the GPU machine: install the carried wheels, run bench/gpu.py, keep its log and JSON.
#
# Prepare here first (any machine with this checkout's venv and a package registry):
#     bash bench/gpu_wheels.sh                 # fills bench/wheels/ (about 20 MiB, gitignored)
# Then, through the device tool, from the repository root (one call; the bench sizes itself to
# about 5.5 minutes, the timeout below leaves room for the machine's slower first compile):
#     run(command="bash bench/gpu_device.sh", carry=["bench/wheels"], timeout_s=600)
# Extra arguments go to bench/gpu.py, e.g. `bash bench/gpu_device.sh --quick` (eager rows only,
# about 2 minutes) or `--rows fp16 --compile on` for the rows a first run's budget skipped.
# Output: the table and the last JSON line on stdout; $OUT/gpu.log and $OUT/gpu.json come back.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/medscale-gpu-bench}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

shopt -s nullglob
wheels=(bench/wheels/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  echo "no wheels in bench/wheels: run bash bench/gpu_wheels.sh on the preparing machine and carry bench/wheels" >&2
  exit 2
fi
# --no-index --no-deps: nothing can be fetched there, and the set is complete (gpu_wheels.sh checked it).
# --target + PYTHONPATH: the machine's own torch stays untouched; the carried wheels come first.
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}  # medscale from this checkout: nothing installs it there
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions  # DeepSpeed's JIT ops, if any, build here

nvidia-smi -L || true
"$PY" -c "import torch, deepspeed, timm, webdataset, pydicom; print('torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| timm', timm.__version__, '|', torch.cuda.get_device_name())"

set -o pipefail
timeout 570 "$PY" bench/gpu.py --json "$OUT/gpu.json" "$@" 2>&1 | tee "$OUT/gpu.log"
