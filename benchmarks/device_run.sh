#!/usr/bin/env bash
# The one command for the GPU machine (see CONTRIBUTING.md, "GPU checks"). Run from the repository
# root with device_wheels/ made by benchmarks/prepare_device_wheels.sh beside it:
#     bash benchmarks/device_run.sh
# 1. installs fxswap and diffusers from device_wheels/ with no registry (--no-index --no-deps) into a
#    scratch folder put first on PYTHONPATH (the machine's own torch, triton, accelerate stay);
# 2. checks the imports and CUDA first: fails within seconds (exit 3 / 4) instead of minutes in;
# 3. runs benchmarks/gpu_check.py under a hard limit (GPU_CHECK_LIMIT_S, default 480 s = 8 min):
#    its own deadline stops starting variants 40 s before, its alarm interrupts the running one 15 s
#    before, and `timeout` kills it at the limit; the JSON is rewritten after every variant, so
#    whatever happens the results so far are in $OUT.
# Everything lands in $OUT (default benchmarks/results/gpu_check): gpu_check.json, gpu_check.log and
# one profiler trace, gpu_check_trace.json.gz.
# DEVICE_RUN_DRY=1 runs the same steps on a machine without CUDA (the check's --dry-run, one tiny
# model): CI uses it to prove the command end to end.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_check}"
WHEELS="${FXSWAP_DEVICE_WHEELS:-device_wheels}"
LIMIT="${GPU_CHECK_LIMIT_S:-480}"
SITE="${FXSWAP_DEVICE_SITE:-/tmp/fxswap_site}"
DRY="${DEVICE_RUN_DRY:-0}"
CHECK_ARGS=()
[ "$DRY" = 1 ] && CHECK_ARGS=(--dry-run --models tiny-t2v-2blocks)
mkdir -p "$OUT"

run() {
  echo "device_run: $(date -u +%FT%TZ), limit ${LIMIT}s, wheels: $(ls "$WHEELS" 2>/dev/null | tr '\n' ' ')"
  if ! ls "$WHEELS"/fxswap-*.whl >/dev/null 2>&1; then
    echo "device_run: no fxswap wheel in $WHEELS/: run benchmarks/prepare_device_wheels.sh first (and carry $WHEELS)"
    return 3
  fi
  source_hash() {
    python3 -c "
import hashlib, pathlib
h = hashlib.sha256()
for p in sorted([*pathlib.Path('fxswap').rglob('*.py'), *pathlib.Path('passes').rglob('*.py'), pathlib.Path('pyproject.toml')]):
    h.update(str(p).encode() + b'\\0' + p.read_bytes())
print(h.hexdigest())
"
  }
  if [ "$(source_hash)" != "$(cat "$WHEELS/SOURCE_SHA256" 2>/dev/null)" ]; then
    echo "device_run: $WHEELS/ was built from other sources than this tree: re-run benchmarks/prepare_device_wheels.sh"
    return 3
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || { echo "device_run: installing the wheels failed"; return 3; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  # From / : in the repository root, `python3 -` would import the source tree's fxswap instead of the
  # wheel's, and the check is that the wheel works.
  (cd / && DEVICE_RUN_DRY="$DRY" timeout 120 python3 -) <<'PY' || { echo "device_run: import check failed"; return 4; }
import os, sys, torch
import fxswap, fxswap.passes.planner, fxswap.compiler, fxswap.bench.calibrate
import diffusers
from diffusers import WanTransformer3DModel
from diffusers.hooks import apply_group_offloading
print("python", sys.version.split()[0], "torch", torch.__version__, "diffusers", diffusers.__version__,
      "fxswap from", fxswap.__file__)
assert fxswap.__file__.startswith(os.environ["PYTHONPATH"].split(":")[0]), "fxswap is not the wheel's"
if os.environ["DEVICE_RUN_DRY"] != "1":
    assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
    props = torch.cuda.get_device_properties(0)
    print("device", props.name, f"{props.total_memory / 2**30:.1f} GiB")
PY
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>/dev/null || true
  timeout -k 10 "$LIMIT" python3 benchmarks/gpu_check.py --out-dir "$OUT" \
    --time-limit "$((LIMIT - 40))" --hard-limit "$((LIMIT - 15))" "${CHECK_ARGS[@]}"
  local rc=$?
  echo "device_run: gpu_check exit $rc (0 = finished without errors; 124 = killed at the limit)"
  return "$rc"
}

run 2>&1 | tee -a "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
ls -l "$OUT"
exit "$rc"
