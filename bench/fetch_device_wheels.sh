#!/usr/bin/env bash
# Run here (where PyPI is reachable), once per checkout: puts the wheels that the lent GPU machine
# lacks for bench/device_full_size.sh into .whl/ (ignored through .git/info/exclude, never
# committed). That machine has Python 3.12 with torch, accelerate, peft, safetensors and
# huggingface_hub, but no diffusers and no gguf (the gguf_q8_0 memory mode's); both are pure
# Python, so one py3 wheel each does (gguf's own needs, numpy, pyyaml, requests, tqdm, are there).
# The wheels are then checked as the device will use them: one version of each (two stop its
# whole install), their needs met by what the device has, and installed here as it installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
# In a linked worktree .git is a file: git says where the (shared) exclude file is.
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
version=$("$python" -c "import diffusers; print(diffusers.__version__)")
gguf_version=$("$python" -c "import importlib.metadata as m; print(m.version('gguf'))")
mkdir -p .whl
rm -f .whl/diffusers-*.whl .whl/gguf-*.whl  # an earlier run's other versions
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    -d .whl "diffusers==$version" "gguf==$gguf_version"
# What the device has (.library/device/KINDS.md, nvidia-h200: its pip list, 2026-11; None: there,
# version not read). importlib_metadata is not there: diffusers imports it only on Python < 3.8.
"$python" - .whl/*.whl <<'EOF'
import sys
import zipfile
from email.parser import Parser

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

PYTHON = "3.12.3"
DEVICE = {"torch": "2.11.0", "numpy": "2.5.2", "safetensors": "0.8.0", "huggingface-hub": "1.33.0",
          "accelerate": "1.15.0", "transformers": "5.17.0", "tokenizers": "0.23.2", "sentencepiece": "0.2.2",
          "filelock": None, "regex": None, "requests": None, "pillow": None, "pyyaml": None, "tqdm": None,
          "packaging": None, "peft": None, "httpx": None, "fsspec": None, "typing-extensions": None}
NOT_NEEDED = {"importlib-metadata"}
env = {"python_version": "3.12", "python_full_version": PYTHON, "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython", "extra": ""}
problems, names = [], {}
for path in sys.argv[1:]:
    with zipfile.ZipFile(path) as wheel:
        meta = Parser().parsestr(wheel.read(next(n for n in wheel.namelist()
                                                 if n.endswith(".dist-info/METADATA"))).decode())
    name = canonicalize_name(meta["Name"])
    names.setdefault(name, []).append(meta["Version"])
    if meta["Requires-Python"] and PYTHON not in SpecifierSet(meta["Requires-Python"]):
        problems.append(f"{name} {meta['Version']} needs Python {meta['Requires-Python']}; the device has {PYTHON}")
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        need = canonicalize_name(req.name)
        if (req.marker and not req.marker.evaluate(env)) or need in NOT_NEEDED:
            continue
        carried = [p for p in sys.argv[1:] if canonicalize_name(p.rsplit("/", 1)[-1].split("-")[0]) == need]
        if carried:
            continue
        if need not in DEVICE:
            problems.append(f"{name} needs {req}, which the device does not have: fetch its wheel too")
        elif DEVICE[need] and req.specifier and not req.specifier.contains(DEVICE[need], prereleases=True):
            problems.append(f"{name} needs {req}; the device has {need} {DEVICE[need]}: fetch an older {name}")
problems += [f"{n}: {len(v)} versions in .whl/ ({', '.join(v)}); keep one" for n, v in names.items() if len(v) > 1]
if problems:
    sys.exit("the device could not use these wheels:\n  " + "\n  ".join(problems))
EOF
# The device's own install, here: a wheel it could not install fails now, not in the lease.
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
ls -l .whl
