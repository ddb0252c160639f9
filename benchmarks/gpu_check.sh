#!/usr/bin/env bash
# Every GPU check of the project in one prepared run, for a session that is lent a device
# machine (one NVIDIA H100/H200 with torch, CuPy, JAX, pytest and hypothesis installed).
#
#   here, once (pure-Python wheels the device machine lacks; .whl/ is git-ignored):
#     python3 -m pip download --no-deps --only-binary=:all: -d .whl \
#         array-api-compat==1.16.0 array-api-strict==2.6.1
#   on the device (carry .whl):
#     bash benchmarks/gpu_check.sh            # writes under $OUT (default ./gpu-out)
#
# Installs only what is missing, then: the GPU tests (torch_cuda and cupy backends, including
# batches above 65,535 full Gaussians) and the GPU benchmark of the issue's targets (KL, d = 6,
# up to 1e6 states, torch/CuPy/JAX). Each stage has its own time limit, so one that hangs
# leaves the others' results; logs, JSON and the markdown report go under $OUT.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! python3 -c "import array_api_compat" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/trp-site .whl/*.whl || exit 1
        export PYTHONPATH="$PYTHONPATH:/tmp/trp-site"
    else
        python3 -m pip install -q array-api-compat || exit 1
    fi
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 - <<'PY'
import importlib
for name in ("numpy", "array_api_compat", "torch", "cupy", "jax", "hypothesis", "pytest"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001 - report whatever is missing
        print(name, "unavailable:", type(exc).__name__, exc)
import tr_projections.testing as t
print("GPU backends:", [b for b in t.available_backends() if b in ("torch_cuda", "cupy")])
PY
} 2>&1 | tee "$OUT/machine.txt"

status=0
TRP_BACKENDS=torch_cuda,cupy timeout 270 python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_projections.py tests/test_gradients.py tests/test_compat.py \
    2>&1 | tee "$OUT/tests.log" || status=1

timeout 240 python3 benchmarks/run.py --device cuda --methods kl --dims 6 \
    --batches 1000,100000,1000000 --budget 0.3 --label gpu \
    --json "$OUT/gpu.json" --markdown "$OUT/gpu.md" 2>&1 | tee "$OUT/bench.log" || status=1
exit $status
