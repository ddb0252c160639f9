"""The benchmark suite keeps working: ``benchmarks/run.py --quick`` runs and writes sane JSON."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "benchmarks" / "run.py"


def _script(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python benchmarks/<name> args...`` from the checkout, its output captured."""
    cmd = [sys.executable, str(REPO / "benchmarks" / name), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.skipif(not RUN.exists(), reason="benchmarks/ is not shipped with this copy")
def test_quick_benchmark_runs(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "quick.json"
    proc = _script("run.py", "--quick", "--backends", "numpy,torch", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "### Targets" in proc.stdout

    result = json.loads(out.read_text())
    assert result["settings"]["quick"] is True
    assert set(result["backends"]) == {"numpy", "torch"}
    cells = result["cells"]
    assert cells
    timed = [c for c in cells if c["status"] == "ok"]
    assert timed, "no cell was timed"
    for c in timed:
        assert c["n"] >= 1
        for key in ("median_s", "q1_s", "q3_s", "min_s"):
            assert math.isfinite(c[key]) and c[key] > 0, (key, c)
        assert all(math.isfinite(t) and t > 0 for t in c["times_s"]), c
    # Every cell either ran, or says why not; forward cells always run.
    for c in cells:
        assert c["status"] in {"ok", "n/a", "skipped"}, c
        if c["mode"] == "forward":
            assert c["status"] == "ok", c
    # Same data and bounds for every backend.
    bounds = {}
    for c in timed:
        key = (c["method"], c["kind"], c["d"], c["batch"])
        bounds.setdefault(key, (c["eps_mean"], c["eps_cov"]))
        assert bounds[key] == (c["eps_mean"], c["eps_cov"]), c


@pytest.mark.skipif(not RUN.exists(), reason="benchmarks/ is not shipped with this copy")
def test_variant_environment_runs_beside_torch(tmp_path):
    """``--variant-env`` adds a ``torch+env`` worker timed on the same cells, and its speed-up
    table; ``--worker-env`` and the variant's environment are recorded in the results."""
    pytest.importorskip("torch")
    out = tmp_path / "variant.json"
    proc = _script(
        "run.py", "--quick", "--backends", "torch", "--methods", "kl", "--kinds", "diag",
        "--no-memory", "--json", str(out), "--variant-env", "MALLOC_MMAP_THRESHOLD_=33554432",
        "--worker-env", "TRP_CHECKS=1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "### Speed-up of torch with the variant environment" in proc.stdout
    result = json.loads(out.read_text())
    assert set(result["backends"]) == {"torch", "torch+env"}
    assert result["settings"]["variant_env"] == {"MALLOC_MMAP_THRESHOLD_": "33554432"}
    assert result["settings"]["worker_env"] == {"TRP_CHECKS": "1"}
    variant = [c for c in result["cells"] if c["backend"] == "torch+env" and c["status"] == "ok"]
    plain = [c for c in result["cells"] if c["backend"] == "torch" and c["status"] == "ok"]
    assert variant and len(variant) == len(plain)


def test_variant_of_other_backends(tmp_path):
    """``--variant-backends`` runs the variant of each named backend (``numpy+env`` here, as
    ``cupy+env`` with ``TRP_FUSED=off`` on a GPU), with a speed-up table each; a variant of a
    backend that is not run is refused."""
    out = tmp_path / "variants.json"
    common = ["--quick", "--methods", "kl", "--kinds", "diag", "--no-memory",
              "--variant-env", "TRP_FUSED=off", "--backends", "numpy"]  # fmt: skip
    proc = _script("run.py", *common, "--variant-backends", "numpy", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "### Speed-up of numpy with the variant environment" in proc.stdout
    result = json.loads(out.read_text())
    assert set(result["backends"]) == {"numpy", "numpy+env"}
    refused = _script("run.py", *common, "--variant-backends", "cupy", timeout=60)
    assert refused.returncode == 2
    assert "--variant-env needs the cupy backend" in refused.stderr
    for args, message in (
        (["--variant-backends", "numpy,numpy", "--variant-env", "TRP_FUSED=off"],
         "names a backend twice"),
        (["--variant-backends", "numpy"], "--variant-backends needs --variant-env"),
    ):  # fmt: skip
        proc = _script("run.py", "--quick", "--backends", "numpy", *args, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_float32_cells_and_a_dtype_variant(tmp_path):
    """``--dtype float32`` projects the float64 data rounded to float32, with the float64
    data's bounds; a worker's ``TRP_BENCH_DTYPE`` (here through ``--variant-env``) projects in
    its own dtype in the same run; a dtype that is not one refuses that backend only."""
    out = tmp_path / "float32.json"
    common = ["--quick", "--backends", "numpy", "--methods", "wasserstein", "--kinds", "full",
              "--no-memory"]  # fmt: skip
    proc = _script(
        "run.py", *common, "--dtype", "float32", "--variant-env", "TRP_BENCH_DTYPE=float64",
        "--variant-backends", "numpy", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "- float32 (rounded from the float64 data" in proc.stdout
    assert "backend numpy+env: device cpu, gradients yes, in float64 (TRP_BENCH_DTYPE)" in (
        proc.stdout
    )
    result = json.loads(out.read_text())
    assert result["settings"]["dtype"] == "float32"
    cells = {(c["backend"], c["d"], c["batch"], c["mode"]): c for c in result["cells"]}
    assert {c["status"] for c in cells.values()} == {"ok"}
    for (backend, d, batch, mode), c in cells.items():
        assert c["dtype"] == ("float64" if backend == "numpy+env" else "float32"), c
        assert c["out_dtype"] == c["dtype"], c  # (what the projection, or its VJP, returned)
        twin = cells[("numpy" if backend == "numpy+env" else "numpy+env", d, batch, mode)]
        assert (c["eps_mean"], c["eps_cov"]) == (twin["eps_mean"], twin["eps_cov"])
        assert c["input_bytes"] * (2 if c["dtype"] == "float32" else 1) == (
            twin["input_bytes"] * (2 if twin["dtype"] == "float32" else 1)
        )
    bad = _script("run.py", *common, "--variant-env", "TRP_BENCH_DTYPE=float16",
                  "--variant-backends", "numpy", "--json", str(tmp_path / "bad.json"))  # fmt: skip
    assert "numpy+env: not available" in bad.stderr and "float16" in bad.stderr, bad.stderr
    assert {c["backend"] for c in json.loads((tmp_path / "bad.json").read_text())["cells"]
            if c["status"] == "ok"} == {"numpy"}  # fmt: skip
    # Every worker projects in --dtype: run.py's own TRP_BENCH_DTYPE is not inherited, and
    # --worker-env may not set it.
    env = {**os.environ, "TRP_BENCH_DTYPE": "float32"}
    cmd = [sys.executable, str(RUN), *common, "--json", str(tmp_path / "env.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = json.loads((tmp_path / "env.json").read_text())["cells"]
    assert {(c["dtype"], c["out_dtype"]) for c in cells} == {("float64", "float64")}
    refused = _script("run.py", *common, "--worker-env", "TRP_BENCH_DTYPE=float32", timeout=60)
    assert refused.returncode == 2 and "use --dtype" in refused.stderr, refused.stderr[-2000:]


@pytest.mark.parametrize(
    ("script", "words"),
    [("gpu_profile.py", ("ops", "blocking")), ("gpu_small.py", ("--batches", "--rounds"))],
)
def test_gpu_scripts_parse(script, words):
    """The GPU scripts (run on a device machine only) at least parse their arguments here."""
    proc = _script(script, "--help", timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(w in proc.stdout for w in words)


def test_worker_env_must_be_key_value():
    proc = _script("run.py", "--quick", "--worker-env", "NOEQUALS", timeout=60)
    assert proc.returncode == 2
    assert "expected KEY=VALUE" in proc.stderr


def _torch_and_git_or_skip() -> None:
    pytest.importorskip("torch")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")


@pytest.mark.parametrize("backend", ["torch", "jax", "numpy"])
def test_in_process_ab_runs(backend):
    """``benchmarks/ab.py`` imports this checkout and a git revision side by side and prints
    both medians and their ratio for forward and forward + backward, with torch tensors,
    jitted JAX arrays or NumPy arrays."""
    _torch_and_git_or_skip()
    if backend == "jax":
        pytest.importorskip("jax")
    proc = _script(
        "ab.py", "HEAD", "--kind", "diag", "--batch", "64", "--rounds", "2",
        "--backend", backend, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    machine = next(line for line in proc.stdout.splitlines() if line.startswith("# machine"))
    assert f"; {backend} " in machine  # (the library the A/B ran with)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| fwd")]
    assert len(rows) == 2
    for row in rows:
        new_ms, base_ms, ratio = row.split("|")[2:5]
        assert float(new_ms) > 0 and float(base_ms) > 0
        assert float(ratio.strip().rstrip("×")) > 0


def test_setting_ab_runs():
    """``benchmarks/setting_ab.py`` times run.py's cells with a package setting as it is and
    changed, in one process, prints both medians and their ratio per backend and mode, and puts
    the setting back; a setting it cannot find is an error that names it."""
    pytest.importorskip("torch")
    proc = _script(
        "setting_ab.py", "_compat.LAPACK_THREADS=1", "--kind", "full", "--batch", "64",
        "--rounds", "2", "--backends", "numpy,torch", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"_compat\.LAPACK_THREADS: \S+ \(as is\) against 1 \(set\)", proc.stdout)
    rows = [line.split("|")[1:6] for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [(r[0].strip(), r[1].strip()) for r in rows[1:]] == [
        (b, m) for b in ("numpy", "torch") for m in ("fwd", "fwd+bwd")
    ]
    for row in rows[1:]:
        assert float(row[2]) > 0 and float(row[3]) > 0 and float(row[4].strip().rstrip("×")) > 0
    if importlib.util.find_spec("jax") is not None:  # (traced and compiled once per value)
        proc = _script(
            "setting_ab.py", "_compat.JAX_CPU_SUBSTITUTION_MAX_D=6", "--kind", "full",
            "--dim", "6", "--batch", "64", "--rounds", "1", "--backends", "jax", timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        rows = [line for line in proc.stdout.splitlines() if line.startswith("| jax |")]
        assert len(rows) == 2
    for bad, message in (
        ("_compat.NO_SUCH=1", "has no attribute 'NO_SUCH'"),
        ("no_such_module.X=1", "no module 'tr_projections.no_such_module'"),
        ("LAPACK_THREADS", "expected MODULE.NAME=VALUE"),
    ):
        proc = _script("setting_ab.py", bad, timeout=60)
        assert proc.returncode != 0 and message in proc.stderr


def test_fresh_process_ab_runs():
    """``benchmarks/fresh.py`` times this checkout and a git revision, each in fresh processes,
    and prints both medians, their ranges, the page faults per call and the speed-up."""
    _torch_and_git_or_skip()
    proc = _script(
        "fresh.py",
        "HEAD",
        "--kind",
        "full",
        "--batch",
        "64",
        "--procs",
        "1",
        "--calls",
        "2",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")][1:]
    assert [row.split("|")[1].strip() for row in rows] == ["this checkout", "HEAD"]
    for row in rows:
        ms, _, faults = row.split("|")[2:5]
        assert float(ms) > 0 and float(faults) >= 0
    assert "speed-up over HEAD:" in proc.stdout


def test_lanes_benchmark_runs():
    """``benchmarks/lanes.py --quick`` times one small cell per backend with the chunks split
    over two lanes, and both settings give the same bits."""
    pytest.importorskip("torch")
    proc = _script("lanes.py", "--quick", timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| numpy") or
            line.startswith("| torch")]  # fmt: skip
    assert len(rows) == 4
    for row in rows:
        in_turn, lanes, ratio, same = (c.strip() for c in row.split("|")[7:11])
        assert float(in_turn) > 0 and float(lanes) > 0 and float(ratio.rstrip("×")) > 0
        assert same == "yes"


def test_parallel_rows_benchmark_runs():
    """``benchmarks/parallel_rows.py --quick`` times every piece both ways and a projection
    with the parts off and as shipped."""
    pytest.importorskip("torch")
    proc = _script("parallel_rows.py", "--quick", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# machine:")
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "2,000" in line]
    assert len(rows) == 6
    for row in rows:
        one, parts, ratio = (c.strip() for c in row.split("|")[3:6])
        assert float(one) > 0 and float(parts) > 0 and float(ratio.rstrip("x")) > 0


def test_eigh_benchmark_on_the_cpu(tmp_path):
    """``benchmarks/eigh.py --device cpu`` times every CPU route of a few small batches for
    several sizes, the host build's kernel among them where a compiler is found, each with
    its eigenvalues checked against NumPy's, and writes them as JSON."""
    from tr_projections.projections import _kl_diag_fused

    out = tmp_path / "eigh.json"
    env_cache = {  # (the kernels on, whatever the environment running the tests says)
        "TRP_CACHE_DIR": str(tmp_path / "cache"), "TRP_FUSED": "auto", "TRP_FUSED_EIGH": "on",
    }  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "eigh.py"), "--device", "cpu", "--d", "2,6,16",
         "--batches", "10,300", "--repeat", "3", "--budget", "0.01", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, **env_cache},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# {")
    rows = json.loads(out.read_text())["rows"]
    routes = {r["route"] for r in rows}
    assert {"numpy", "numpy (_compat)"} <= routes
    if _kl_diag_fused.compiler() is not None:
        assert {"kernel (_compat)", "kernel, 1 thread", "kernel, split"} <= routes
    assert {(r["d"], r["batch"]) for r in rows} == {(d, b) for d in (2, 6, 16) for b in (10, 300)}
    for r in rows:
        if r["route"] == "kernel (_compat)" and r["d"] == 16:  # (beyond EIGH_MAX_D: LAPACK's)
            assert r["status"] == "n/a", r
            continue
        assert r["status"] == "ok", r
        assert r["median_s"] > 0 and r["max_rel_err"] < 1e-12
    assert "| n/a |" in proc.stdout or _kl_diag_fused.compiler() is None


def test_value_checks_benchmark_runs():
    """``benchmarks/value_checks.py --quick`` times both forms of the full factors' checks and
    a whole call's checks on each library, and the two forms agree on valid and bad batches."""
    pytest.importorskip("torch")
    proc = _script("value_checks.py", "--quick", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# machine:")
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| numpy", "| torch"))]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.split("|")[4:9]]
        assert float(cells[0]) > 0 and float(cells[1]) > 0 and float(cells[4]) > 0
        assert cells[3] == "yes"


def test_w2_roots_runs():
    """``benchmarks/w2_roots.py`` times the W2 projection of the same Gaussians as Cholesky
    factors and as symmetric roots, per backend and mode, and says how far apart the two forms'
    projected covariances are."""
    pytest.importorskip("torch")
    proc = _script(
        "w2_roots.py", "--dims", "3", "--batches", "40", "--backends", "numpy,torch",
        "--rounds", "1", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("|")[1:9] for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [(r[0].strip(), r[3].strip()) for r in rows[1:]] == [
        (b, m) for b in ("numpy", "torch") for m in ("fwd", "fwd+bwd")
    ]
    for row in rows[1:]:
        assert all(float(v) > 0 for v in row[4:7])
    gap = re.search(r"covariances agree to (\S+)", proc.stdout)
    assert gap is not None and float(gap.group(1)) < 1e-10
    proc = _script(
        "w2_roots.py", "--dims", "3", "--batches", "40", "--backends", "numpy",
        "--modes", "none", "--memory", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    row = [line for line in proc.stdout.splitlines() if line.startswith("| numpy |")]
    assert len(row) == 1  # (no timing rows with --modes none: the memory table's only)
    ratios = [float(v.strip().rstrip("×")) for v in row[0].split("|")[2:4]]
    assert all(r > 0 for r in ratios)


def test_root_routes_benchmark_runs():
    """``benchmarks/root_routes.py --quick`` times both routes of the torch CPU inverse of a
    root and of the PD test, and both agree (the inverses to rounding, the tests exactly)."""
    pytest.importorskip("torch")
    proc = _script("root_routes.py", "--quick", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# machine:")
    rows = [line.split("|")[1:12] for line in proc.stdout.splitlines() if line.startswith("| 6 ")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0]]
    assert all(float(cells[k]) > 0 for k in (2, 3, 7, 8))
    assert float(cells[5]) < 1e-12 and float(cells[6]) < 1e-12  # (LU against Cholesky form)
    assert cells[10] == "yes"


def test_jax_eager_benchmark_runs():
    """``benchmarks/jax_eager.py`` times both routes of concrete JAX arrays, and of an eager
    ``jax.vmap`` of ``jax.grad`` (mode ``vmap+grad``), in fresh processes and counts
    compilations; the compiled route compiles nothing for new bounds (a cell that op by op
    compiles nothing either: diagonal Frobenius, which selects no rows below 8,192)."""
    pytest.importorskip("jax")
    proc = _script(
        "jax_eager.py", "--methods", "frobenius", "--kinds", "diag", "--modes", "fwd,vmap+grad",
        "--batches", "100", "--calls", "2", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# machine:")
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 10 and cells[0] == "frobenius":
            rows[cells[2], cells[4]] = cells
    assert set(rows) == {(m, r) for m in ("fwd", "vmap+grad") for r in ("op by op", "compiled")}
    assert all(float(r[k].replace(",", "")) > 0 for r in rows.values() for k in (5, 7, 9))
    assert rows["fwd", "compiled"][8] == "0" and rows["vmap+grad", "compiled"][8] == "0"


def _table_rows(stdout: str, prefix: str) -> list[list[str]]:
    """The cells of the markdown table rows of ``stdout`` that start with ``prefix``."""
    return [[c.strip() for c in line.split("|")[1:-1]] for line in stdout.splitlines()
            if line.startswith(prefix)]  # fmt: skip


def test_jax_checks_benchmark_runs():
    """``benchmarks/jax_checks.py --quick`` times each call with the checks as one program, op
    by op and off; ``jax_eager.py --no-op-by-op`` leaves that route out of its cells."""
    pytest.importorskip("jax")
    proc = _script("jax_checks.py", "--quick", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# machine:")
    rows = _table_rows(proc.stdout, "| diag")
    assert [r[2] for r in rows] == ["checks", "kl", "project", "vjp", "grad kl"]
    for r in rows:
        assert all(float(v) > 0 for v in r[3:5]) and r[6].endswith("×")
    assert float(rows[0][5]) < float(rows[0][4])  # (checks off: nothing to time)
    spec = importlib.util.spec_from_file_location("jax_eager", REPO / "benchmarks" / "jax_eager.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    routes_of = module.routes_of
    assert routes_of("fwd", op_by_op=True, ref=None) == ("op by op", "compiled")
    assert routes_of("dist", op_by_op=False, ref="abc") == ("compiled", "torch", "abc")


def test_jax_entropy_benchmark_runs():
    """``benchmarks/jax_entropy.py --quick`` times the entropy, its projection and an eager
    gradient of it compiled, op by op and jitted."""
    pytest.importorskip("jax")
    proc = _script("jax_entropy.py", "--quick", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# machine:")
    rows = _table_rows(proc.stdout, "| diag")
    assert [r[2] for r in rows] == ["entropy", "project", "grad"]
    for r in rows:
        assert all(float(v) > 0 for v in r[3:6]) and r[6].endswith("×")


def test_distances_ab_runs():
    """``benchmarks/distances.py`` times the KL distance and loss of this checkout and a git
    revision side by side (torch and NumPy), Hessian-vector products included, each checked for
    NaN (this checkout's must be finite: no cell of its column is marked)."""
    _torch_and_git_or_skip()
    proc = _script(
        "distances.py", "HEAD", "--functions", "kl,loss-kl", "--batches", "50", "--dims", "3",
        "--rounds", "2", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# machine:")
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in proc.stdout.splitlines()
            if line.startswith("| kl") or line.startswith("| loss-kl")]  # fmt: skip
    modes = {(r[0], r[4], r[5]) for r in rows}
    assert ("kl", "torch", "hvp") in modes and ("loss-kl", "numpy", "fwd+bwd") in modes
    assert ("kl", "numpy", "fwd+bwd") not in modes  # (no VJP of the distance of its own)
    assert len(modes) == len(rows) == 8
    assert all(float(r[6]) > 0 and "nan" not in r[6] for r in rows)


def test_jax_eager_benchmark_times_distances():
    """``benchmarks/jax_eager.py --modes dist,dist+grad`` times a distance and its eager
    gradient on new data on both routes and with torch; the compiled route compiles nothing."""
    pytest.importorskip("jax")
    pytest.importorskip("torch")
    proc = _script(
        "jax_eager.py", "--methods", "kl", "--kinds", "diag", "--modes", "dist,dist+grad",
        "--batches", "50", "--calls", "2", "--data", "far", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 10 and cells[0] == "kl":
            rows[(cells[2], cells[4])] = cells
    assert set(rows) == {(m, r) for m in ("dist", "dist+grad")
                         for r in ("op by op", "compiled", "torch")}  # fmt: skip
    assert all(rows[(m, "compiled")][8] == "0" for m in ("dist", "dist+grad"))


def test_ab_of_roots_runs():
    """``benchmarks/ab.py --root`` compares the W2 projection of symmetric roots; ``--root``
    with another method is refused."""
    _torch_and_git_or_skip()
    proc = _script(
        "ab.py", "HEAD", "--method", "wasserstein", "--root", "--dim", "3", "--batch", "40",
        "--rounds", "2", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "(symmetric roots, root=True)" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| fwd")]
    assert len(rows) == 2
    proc = _script("ab.py", "HEAD", "--method", "kl", "--root", timeout=60)
    assert proc.returncode != 0 and "--root needs --method wasserstein" in proc.stderr


def test_gpu_check_script_parses():
    """``benchmarks/gpu_check.sh`` (run on a device machine only) is valid bash, and each mode
    its header documents is one it handles."""
    script = REPO / "benchmarks" / "gpu_check.sh"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    modes = set(re.findall(r"gpu_check\.sh (\w+) ", text))
    assert modes == {"targets", "small", "roots"}
    for mode in modes:
        assert f'[ "${{1:-}}" = {mode} ]' in text
