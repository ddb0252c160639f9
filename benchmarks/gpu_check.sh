#!/usr/bin/env bash
# Every GPU check of the project in one prepared run, for a session that is lent a device
# machine (one NVIDIA H100/H200 with torch, CuPy, JAX, pytest and hypothesis installed).
#
#   here, once (pure-Python wheels the device machine lacks; .whl/ is git-ignored):
#     python3 -m pip download --no-deps --only-binary=:all: -d .whl \
#         array-api-compat==1.16.0 array-api-strict==2.6.1
#   on the device (carry .whl):
#     bash benchmarks/gpu_check.sh            # writes under $OUT (default ./gpu-out), <= 9.5 min
#                                             # (stage limits 570 s in all, plus installs)
#     bash benchmarks/gpu_check.sh targets    # <= 8.5 min (stage limits 480 s): the target rows
#     bash benchmarks/gpu_check.sh small      # <= 3 min: the small-matrix kernels' GPU tests and
#                                             # benchmarks/gpu_small.py at a million matrices
#     bash benchmarks/gpu_check.sh roots      # <= 8 min (stage limits 450 s): W2 of symmetric
#                                             # roots (root=True) on the GPU: tests/test_w2_roots.py
#                                             # on torch_cuda and cupy (70,000 roots included);
#                                             # benchmarks/w2_roots.py at 1e5 and 1e6 states,
#                                             # torch_cuda and cupy, then jax_cuda on its own
#
# Installs only what is missing, then, each stage under its own time limit (one that hangs
# leaves the others' results; every benchmark cell is printed as it is timed), all output also
# in $OUT/log.txt:
#   1. the fused diagonal KL kernels' GPU tests (tests/test_kl_fused.py): torch CUDA and CuPy,
#      float32 and float64, against the array-API form; (targets) the small-matrix kernels'
#      (tests/test_small_kernels.py), against NumPy;
#   2. (whole run) batched eigh routes (benchmarks/eigh.py): torch in chunks, torch->CuPy,
#      CuPy, JAX;
#   3. KL, diagonal, d = 6 (targets: B = 1e6), torch/CuPy/JAX, with TRP_FUSED=off (the
#      array-API form instead of the fused kernels) interleaved as torch_cuda+env and cupy+env;
#   4. KL, full, d = 6, with torch's own eigh (TRP_TORCH_CUDA_EIGH=torch) interleaved as
#      torch_cuda+env: the eigh route end to end;
#   5. (whole run) Frobenius and W2 at 1e6 states;
#   6. the GPU tests: the eigh routes (tests/test_compat.py), the large batches and
#      batch-vs-rows, and every KL test of the projections, gradients and robustness suites
#      (targets) or those whole suites (whole run), on the torch_cuda and cupy backends, and
#      (whole run) the "jax" backend on the GPU for its bound properties; batches above 65,535
#      full Gaussians included.
# Files that come back (at most 8): log.txt, eigh.json, kl-full.json, kl-diag.json,
# other.json, tests.log (small: log.txt, tests.log, small.txt; roots: log.txt, tests.log,
# roots.txt).
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
try:
    import jax
    print("jax devices:", jax.devices())
except Exception as exc:  # noqa: BLE001 - report whatever is missing
    print("jax unavailable:", type(exc).__name__, exc)
import tr_projections.testing as t
print("backends:", t.available_backends())
PY
} 2>&1 | tee -a "$LOG"

status=0
if [ "${1:-}" = targets ]; then
    BATCHES=100000,1000000 MODES=backward
    T_FULL=100 T_DIAG=90
else
    BATCHES=1000,100000,1000000 MODES=forward,backward EIGH_B=1000,10000,100000,1000000
    T_FULL=120 T_DIAG=90
fi
bench() { # bench SECONDS NAME ARGS...: one stage of benchmarks/run.py
    local seconds=$1 name=$2
    shift 2
    stage "benchmark: $name" | tee -a "$LOG"
    timeout "$seconds" python3 benchmarks/run.py --device cuda --dims 6 --budget 0.2 \
        --cell-timeout 30 --verbose --label "gpu-$name" --json "$OUT/$name.json" "$@" 2>&1 \
        | tee -a "$LOG" || status=1
}
: >"$OUT/tests.log"
gpu_tests() { # gpu_tests SECONDS BACKENDS PYTEST-ARGS...
    local seconds=$1 backends=$2
    shift 2
    stage "tests: $backends $*" | tee -a "$LOG"
    TRP_BACKENDS=$backends timeout "$seconds" python3 -m pytest -q --tb=short \
        -p no:cacheprovider "$@" 2>&1 | tee -a "$OUT/tests.log" | tail -40 >>"$LOG" || status=1
}

if [ "${1:-}" = roots ]; then
    gpu_tests 150 torch_cuda,cupy tests/test_w2_roots.py
    # (the data, roots and bounds are made on the host: all its threads; JAX in its own call,
    # which compiles every cell and fails whole where it sees no GPU)
    for backends in torch_cuda,cupy jax_cuda; do
        stage "benchmarks/w2_roots.py $backends" | tee -a "$LOG"
        timeout 150 python3 benchmarks/w2_roots.py --backends "$backends" --threads "$(nproc)" \
            --batches 1e5,1e6 --rounds 5 2>&1 | tee -a "$LOG" "$OUT/roots.txt" || status=1
    done
    stage "done, status $status" | tee -a "$LOG"
    exit $status
fi

if [ "${1:-}" = small ]; then
    gpu_tests 90 torch_cuda,cupy tests/test_small_kernels.py
    stage "benchmarks/gpu_small.py" | tee -a "$LOG"
    timeout 60 python3 benchmarks/gpu_small.py --batches 1000000 --rounds 11 2>&1 \
        | tee -a "$LOG" "$OUT/small.txt" || status=1
    stage "done, status $status" | tee -a "$LOG"
    exit $status
fi

gpu_tests 90 torch_cuda,cupy tests/test_kl_fused.py
if [ "${1:-}" = targets ]; then
    gpu_tests 90 torch_cuda,cupy tests/test_small_kernels.py
fi

if [ "${1:-}" != targets ]; then
    stage eigh | tee -a "$LOG"
    timeout 30 python3 benchmarks/eigh.py --device cuda --batches "$EIGH_B" \
        --json "$OUT/eigh.json" 2>&1 | tee -a "$LOG" || status=1
fi

bench "$T_DIAG" kl-diag --methods kl --kinds diag --batches "$BATCHES" --modes forward,backward \
    --variant-env TRP_FUSED=off --variant-backends torch_cuda,cupy
bench "$T_FULL" kl-full --methods kl --kinds full --batches "$BATCHES" --modes "$MODES" \
    --variant-env TRP_TORCH_CUDA_EIGH=torch
if [ "${1:-}" != targets ]; then
    bench 70 other --methods frobenius,wasserstein --kinds diag,full --batches 1000000 \
        --modes backward
fi

gpu_tests 30 torch_cuda,cupy tests/test_compat.py -k "_eigh or eigh_"
if [ "${1:-}" = targets ]; then
    gpu_tests 80 torch_cuda,cupy tests/test_projections.py tests/test_gradients.py \
        tests/test_robustness.py -k "large_gpu_batches or batch_equals_rows or kl"
else
    gpu_tests 100 torch_cuda,cupy tests/test_projections.py tests/test_gradients.py \
        tests/test_compat.py tests/test_robustness.py
    # JAX compiles every example's shapes anew (test_projections alone: 3 min on 2 CPU
    # cores): on the GPU only the large batches and the float64 bound properties.
    TRP_EXAMPLES=5 gpu_tests 40 jax tests/test_projections.py \
        -k "large_gpu_batches or (bounds_hold and float64)"
fi
tail -5 "$OUT/tests.log"
stage "done, status $status" | tee -a "$LOG"
exit $status
