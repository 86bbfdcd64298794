#!/usr/bin/env bash
# Prepares device_wheels/ (git-ignored) for benchmarks/device_run.sh on the GPU machine, which has
# Python 3.12 and torch 2.11 but no package registry: fxswap itself as a wheel (built here, so nothing
# needs build isolation there) plus diffusers and the one dependency of it that machine lacks, as
# Python 3.12 wheels. Then it installs the folder exactly as the device command will (no index, no
# deps, into a scratch target) and imports it, so a broken wheel fails here, not on the GPU.
# Usage: bash benchmarks/prepare_device_wheels.sh      (about 20 s; a few MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${FXSWAP_DEVICE_WHEELS:-device_wheels}"
# diffusers' runtime needs besides what the GPU machine has (its package list: filelock,
# huggingface-hub 1.33, numpy, regex, requests, safetensors 0.8, pillow, accelerate): only importlib_metadata.
DIFFUSERS="${FXSWAP_DEVICE_DIFFUSERS:-diffusers==0.42.1}"
EXTRA=(importlib_metadata)
rm -rf "$WHEELS"
mkdir -p "$WHEELS"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  -d "$WHEELS" "$DIFFUSERS" "${EXTRA[@]}"
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" .
# The sources the fxswap wheel was built from: device_run.sh refuses a wheel older than the tree.
source_hash() {
  python3 -c "
import hashlib, pathlib
h = hashlib.sha256()
for p in sorted([*pathlib.Path('fxswap').rglob('*.py'), *pathlib.Path('passes').rglob('*.py'), pathlib.Path('pyproject.toml')]):
    h.update(str(p).encode() + b'\\0' + p.read_bytes())
print(h.hexdigest())
"
}
source_hash > "$WHEELS/SOURCE_SHA256"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$scratch" "$WHEELS"/*.whl
(cd "$scratch" && PYTHONPATH="$scratch" python3 -c "
import fxswap, fxswap.passes.planner, diffusers
from diffusers import WanTransformer3DModel
assert fxswap.__file__.startswith('$scratch'), fxswap.__file__
print('imports ok from the wheels: fxswap', fxswap.__version__ if hasattr(fxswap, '__version__') else '', 'diffusers', diffusers.__version__)
")
ls -l "$WHEELS"
du -sh "$WHEELS"
