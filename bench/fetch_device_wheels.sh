#!/usr/bin/env bash
# Run here (where PyPI is reachable), once per checkout: puts the wheels that the lent GPU machine
# lacks for bench/device_full_size.sh into .whl/ (ignored through .git/info/exclude, never
# committed). That machine has Python 3.12 with torch, accelerate, peft, safetensors and
# huggingface_hub, but no diffusers and no gguf (the gguf_q8_0 memory mode's); both are pure
# Python, so one py3 wheel each does (gguf's own needs, numpy, pyyaml, requests, tqdm, are there).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
version=$("$python" -c "import diffusers; print(diffusers.__version__)")
gguf_version=$("$python" -c "import importlib.metadata as m; print(m.version('gguf'))")
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    -d .whl "diffusers==$version" "gguf==$gguf_version"
ls -l .whl
