#!/usr/bin/env bash
# The full-size benchmark as one prepared run on a lent GPU machine (the workplace's `device`
# tool: 15 minutes of device time per session, start-up included, 10 minutes per command).
#
#   bench/fetch_device_wheels.sh                       # here, first: diffusers into .whl/
#   device run: bash bench/device_full_size.sh         # carry [".whl"], timeout_s 570
#
# Extra arguments go to bench/run.py (e.g. --speedups fuse_qkv --memory-modes none,fp8_storage).
# bench/run.py rewrites $OUT/bench-full.{json,md} after every section, so a run stopped by the
# time limit still returns what it measured; the log and the GPU's description come back too.
# Elsewhere (any CUDA machine with torch and diffusers) it runs the same, writing bench/results/.
# A dry run of this script on a CPU: PYTHON=.venv/bin/python BENCH_MODE=--tiny bash bench/device_full_size.sh
set -uo pipefail
python="${PYTHON:-python3}"
out="${OUT:-bench/results}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/fluxsr-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/fluxsr-site
fi
# Without diffusers nothing below can run: stop here, before the device time goes on imports that fail.
"$python" -c "import diffusers" 2>&1 | tee "$out/gpu.txt" || {  # pipefail: the import's status
    echo "diffusers is not importable: run bench/fetch_device_wheels.sh first and carry .whl/" | tee -a "$out/gpu.txt"
    exit 1; }
# fluxsr_core straight from the checkout: nothing to install on a machine without a registry.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$python" -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"
} 2>&1 | tee "$out/gpu.txt"
# Ends a little before the command's own limit, so the files written so far come back.
budget="${BENCH_TIMEOUT_S:-540}"
# First, in a fixed slot, the activation peaks per part on CUDA's kernels (seconds on a GPU; it
# writes its report only at the end): what --memory-mode auto's headroom is calibrated from.
timeout -k 5 90 "$python" bench/run.py "${BENCH_MODE:---full-size}" --activation-peaks --out "$out" 2>&1 \
    | tee "$out/log.txt"
# Then the full report in what is left (it saves after every section).
timeout -k 5 "$((budget - SECONDS - 5))" "$python" bench/run.py "${BENCH_MODE:---full-size}" --out "$out" "$@" 2>&1 \
    | tee -a "$out/log.txt"
