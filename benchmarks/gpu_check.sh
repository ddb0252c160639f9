#!/usr/bin/env bash
# Every GPU check of the project in one prepared run, for a session that is lent a device
# machine (one NVIDIA H100/H200 with torch, CuPy, JAX, pytest and hypothesis installed).
#
#   here, once (pure-Python wheels the device machine lacks; .whl/ is git-ignored):
#     python3 -m pip download --no-deps --only-binary=:all: -d .whl \
#         array-api-compat==1.16.0 array-api-strict==2.6.1
#   on the device (carry .whl):
#     bash benchmarks/gpu_check.sh            # writes under $OUT (default ./gpu-out), <= 9 min
#     bash benchmarks/gpu_check.sh targets    # ~4 min: only the issue's GPU target rows (KL,
#                                             # 1e5 and 1e6 states, fwd+bwd), eigh at 1e5/1e6,
#                                             # and the GPU tests of large batches
#
# Installs only what is missing, then, each stage under its own time limit (one that hangs
# leaves the others' results), all output also in $OUT/log.txt:
#   1. batched eigh routes (benchmarks/eigh.py): torch in chunks, torch->CuPy, CuPy, JAX;
#   2. the GPU benchmark of the issue's targets: KL, d = 6, diag and full, B 1e3, 1e5, 1e6,
#      torch/CuPy/JAX, and torch with TRP_ROW_SELECTION=0 (every stage on the whole batch, no
#      row gathering: fewer operations and host reads) interleaved as torch_cuda+env;
#   3. Frobenius and W2 at 1e6 states;
#   4. the GPU tests: torch_cuda and cupy backends, and the "jax" backend (on the GPU) for its
#      bound properties; including batches above 65,535 full Gaussians.
# At most 8 files come back: log.txt, eigh.json, gpu-kl.{json,md}, gpu-other.{json,md}, tests.log.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false # JAX shares the GPU with torch and CuPy

if ! python3 -c "import array_api_compat, array_api_strict" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/trp-site .whl/*.whl || exit 1
        export PYTHONPATH="$PYTHONPATH:/tmp/trp-site"
    else
        python3 -m pip install -q array-api-compat array-api-strict || exit 1
    fi
fi

stage() { echo; echo "=== $* ($(date -u +%T))"; }

{
    stage machine
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    nproc
    python3 - <<'PY'
import importlib
for name in ("numpy", "array_api_compat", "array_api_strict", "torch", "cupy", "jax", "hypothesis", "pytest"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001 - report whatever is missing
        print(name, "unavailable:", type(exc).__name__, exc)
import jax
print("jax devices:", jax.devices())
import tr_projections.testing as t
print("backends:", t.available_backends())
PY
} 2>&1 | tee -a "$LOG"

status=0
if [ "${1:-}" = targets ]; then
    stage eigh | tee -a "$LOG"
    timeout 45 python3 benchmarks/eigh.py --device cuda --batches 100000,1000000 \
        --json "$OUT/eigh.json" 2>&1 | tee -a "$LOG" || status=1
    stage "benchmark: KL targets" | tee -a "$LOG"
    timeout 140 python3 benchmarks/run.py --device cuda --methods kl --kinds diag,full --dims 6 \
        --batches 100000,1000000 --modes backward --budget 0.2 --cell-timeout 30 --verbose \
        --variant-env TRP_ROW_SELECTION=0 --label gpu-kl \
        --json "$OUT/gpu-kl.json" --markdown "$OUT/gpu-kl.md" 2>&1 | tee -a "$LOG" || status=1
    stage tests | tee -a "$LOG"
    TRP_BACKENDS=torch_cuda,cupy timeout 75 python3 -m pytest -q --tb=short -p no:cacheprovider \
        tests/test_projections.py tests/test_compat.py \
        -k "large_gpu_batches or batch_equals_rows or eigh" 2>&1 | tee "$OUT/tests.log" \
        | tail -60 >>"$LOG" || status=1
    stage "done, status $status" | tee -a "$LOG"
    exit $status
fi

stage eigh | tee -a "$LOG"
timeout 40 python3 benchmarks/eigh.py --device cuda --batches 10000,100000,1000000 \
    --json "$OUT/eigh.json" 2>&1 | tee -a "$LOG" || status=1

stage "benchmark: KL targets" | tee -a "$LOG"
timeout 180 python3 benchmarks/run.py --device cuda --methods kl --kinds diag,full --dims 6 \
    --batches 1000,100000,1000000 --budget 0.2 --cell-timeout 40 --verbose \
    --variant-env TRP_ROW_SELECTION=0 --label gpu-kl \
    --json "$OUT/gpu-kl.json" --markdown "$OUT/gpu-kl.md" 2>&1 | tee -a "$LOG" || status=1

stage "benchmark: Frobenius and W2" | tee -a "$LOG"
timeout 70 python3 benchmarks/run.py --device cuda --methods frobenius,wasserstein \
    --kinds diag,full --dims 6 --batches 1000000 --modes backward --budget 0.2 \
    --cell-timeout 30 --verbose --label gpu-other \
    --json "$OUT/gpu-other.json" --markdown "$OUT/gpu-other.md" 2>&1 | tee -a "$LOG" || status=1

stage tests | tee -a "$LOG"
TRP_BACKENDS=torch_cuda,cupy timeout 160 python3 -m pytest -q --tb=short -p no:cacheprovider \
    tests/test_projections.py tests/test_gradients.py tests/test_compat.py \
    tests/test_robustness.py 2>&1 | tee "$OUT/tests.log" | tail -40 >>"$LOG" || status=1
# JAX compiles every example's shapes anew (test_projections alone: 3 min on 2 CPU cores): on
# the GPU only the large batches and the float64 bound properties, with fewer examples.
TRP_BACKENDS=jax TRP_EXAMPLES=5 timeout 50 python3 -m pytest -q -p no:cacheprovider \
    tests/test_projections.py -k "large_gpu_batches or (bounds_hold and float64)" 2>&1 \
    | tee -a "$OUT/tests.log" | tail -20 >>"$LOG" || status=1
tail -5 "$OUT/tests.log"
stage "done, status $status" | tee -a "$LOG"
exit $status
