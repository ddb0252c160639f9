"""Tables and target checks of a benchmark run (standard library only; used by ``run.py``)."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any

METHOD_NAMES = {"kl": "KL", "frobenius": "Frobenius", "wasserstein": "W2"}
MODE_NAMES = {"forward": "fwd", "backward": "fwd+bwd"}

#: The issue's time targets: (method, kind, d, batch, limit in seconds), forward + backward,
#: float64, 2 threads, torch tensors.
CPU_TARGETS = [
    ("kl", "full", 6, 100_000, 0.500),
    ("kl", "full", 6, 1_000, 0.005),
    ("kl", "diag", 6, 100_000, 0.025),
    ("frobenius", "full", 6, 100_000, 0.160),
    ("wasserstein", "full", 6, 100_000, 0.160),
]
#: GPU targets, for torch, CuPy and JAX alike.
GPU_TARGETS = [
    ("kl", "full", 6, 1_000_000, 0.050),
    ("kl", "diag", 6, 1_000_000, 0.005),
]
GPU_BACKENDS = ("torch_cuda", "cupy", "jax_cuda")
#: Other backends must be within this factor of torch for the same work.
RATIO_LIMIT = 2.0
#: Peak extra memory must stay below this multiple of the input size.
MEMORY_LIMIT = 4.0


def load_line(when: str) -> str:
    """``# load average at <when>: ...`` (the scripts that run their variants in turn print it
    at start and end: a busy shared machine shows in it)."""
    return f"# load average at {when}: " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def fmt_ms(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_batch(b: int) -> str:
    exp = round(math.log10(b)) if b > 0 else 0
    return f"1e{exp}" if 10**exp == b else f"{b:,}"


class Index:
    """Cells by ``(method, kind, d, batch, mode, backend)``."""

    def __init__(self, cells: list[dict[str, Any]]) -> None:
        self.cells = cells
        self.by_key = {
            (c["method"], c["kind"], c["d"], c["batch"], c["mode"], c["backend"]): c for c in cells
        }

    def get(self, method, kind, d, batch, mode, backend) -> dict[str, Any] | None:
        return self.by_key.get((method, kind, d, batch, mode, backend))

    def best(self, method, kind, d, batch, backend) -> tuple[dict[str, Any] | None, str]:
        """The forward+backward cell if it ran, else the forward one; and the mode used."""
        for mode in ("backward", "forward"):
            c = self.get(method, kind, d, batch, mode, backend)
            if c is not None and c.get("status") == "ok":
                return c, mode
        return None, "backward"


def cell_text(c: dict[str, Any] | None) -> str:
    if c is None:
        return ""
    status = c.get("status")
    if status == "ok":
        text = fmt_ms(c["median_s"])
        if c.get("n", 0) >= 2:
            text += f" ({fmt_ms(c['iqr_s'])})"
        if c.get("note"):
            text += "*"
        return text
    return {"n/a": "n/a", "skipped": "skip"}.get(status, "err")


def evaluate_targets(cells: list[dict[str, Any]], backends: list[str]) -> list[dict[str, Any]]:
    """Every target row of the issue that this run can check, with its verdict."""
    idx = Index(cells)
    rows: list[dict[str, Any]] = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("PASS" if ok else "FAIL")

    def add(name, backend, value, limit, unit, ok, note=""):
        rows.append(
            {
                "target": name,
                "backend": backend,
                "value": value,
                "limit": limit,
                "unit": unit,
                "result": verdict(ok),
                "note": note,
            }
        )

    def label(method, kind, d, batch):
        return f"{METHOD_NAMES[method]} {kind} d={d} B={batch:,}"

    gpu = [b for b in backends if b in GPU_BACKENDS]
    time_rows = [(t, "torch") for t in CPU_TARGETS] if "torch" in backends else []
    time_rows += [(t, b) for t in GPU_TARGETS for b in gpu]
    for (method, kind, d, batch, limit), backend in time_rows:
        c, mode = idx.best(method, kind, d, batch, backend)
        value = c["median_s"] if c else None
        note = "" if mode == "backward" else "forward only (no gradients)"
        if c is None:
            note = "not run"
        add(
            f"{label(method, kind, d, batch)}, fwd+bwd ≤ {limit * 1e3:g} ms",
            backend,
            value,
            limit,
            "s",
            None if c is None else value <= limit,
            note,
        )
    if "torch" in backends:
        for method, kind, d, batch, _ in CPU_TARGETS:
            ref, ref_mode = idx.best(method, kind, d, batch, "torch")
            for other in ("numpy", "jax"):
                if other not in backends:
                    continue
                c = idx.get(method, kind, d, batch, ref_mode, other)
                ok = ref is not None and c is not None and c.get("status") == "ok"
                ratio = c["median_s"] / ref["median_s"] if ok else None
                add(
                    f"{label(method, kind, d, batch)}, {other}/torch ≤ {RATIO_LIMIT:g}×",
                    other,
                    ratio,
                    RATIO_LIMIT,
                    "×",
                    None if ratio is None else ratio <= RATIO_LIMIT,
                    "" if ref_mode == "backward" else "forward only",
                )
    # Diagonal Gaussians must cost O(B·d): time at the largest d over time at d=6, at the largest
    # B, should grow at most like d (allowing a factor 2 for noise and fixed costs).
    diag = [c for c in cells if c["kind"] == "diag" and c.get("status") == "ok"]
    for backend in backends:
        for method in METHOD_NAMES:
            sub = [c for c in diag if c["backend"] == backend and c["method"] == method]
            if not sub:
                continue
            batch = max(c["batch"] for c in sub)
            dims = sorted({c["d"] for c in sub if c["batch"] == batch})
            if 6 not in dims or dims[-1] <= 6:
                continue
            hi = dims[-1]
            lo_c, mode = idx.best(method, "diag", 6, batch, backend)
            hi_c = idx.get(method, "diag", hi, batch, mode, backend)
            if lo_c is None or hi_c is None or hi_c.get("status") != "ok":
                continue
            ratio = hi_c["median_s"] / lo_c["median_s"]
            limit = 2 * hi / 6
            add(
                f"{METHOD_NAMES[method]} diag B={batch:,}: time(d={hi})/time(d=6) ≤ {limit:.1f}"
                " (O(B·d))",
                backend,
                ratio,
                limit,
                "×",
                ratio <= limit,
                "" if mode == "backward" else "forward only",
            )
    for backend in backends:
        for method in METHOD_NAMES:
            for kind in ("diag", "full"):
                sub = [
                    c
                    for c in cells
                    if (c["backend"], c["method"], c["kind"], c["d"]) == (backend, method, kind, 6)
                    and c.get("mem_ratio") is not None
                ]
                if not sub:
                    continue
                batch = max(c["batch"] for c in sub)
                c, mode = idx.best(method, kind, 6, batch, backend)
                if c is None or c.get("mem_ratio") is None:
                    continue
                add(
                    f"{label(method, kind, 6, batch)}, peak extra memory ≤ {MEMORY_LIMIT:g}× input",
                    backend,
                    c["mem_ratio"],
                    MEMORY_LIMIT,
                    "×",
                    c["mem_ratio"] <= MEMORY_LIMIT,
                    "" if mode == "backward" else "forward only",
                )
    big = [c for c in cells if c["backend"] in GPU_BACKENDS and c["batch"] > 65_535]
    for backend in gpu:
        sub = [c for c in big if c["backend"] == backend and c.get("status") != "skipped"]
        if sub:
            bad = [c for c in sub if c.get("status") == "error"]
            add(
                "batches above 65,535 work",
                backend,
                len(sub) - len(bad),
                len(sub),
                "cells",
                not bad,
                f"{len(bad)} failed" if bad else "",
            )
    return rows


def targets_table(rows: list[dict[str, Any]]) -> list[str]:
    """The targets this run measured; the others are counted in one line."""
    lines = ["| target | backend | measured | result | note |", "|---|---|---|---|---|"]
    unchecked = [r for r in rows if r["value"] is None]
    for r in rows:
        v = r["value"]
        if v is None:
            continue
        if r["unit"] == "s":
            shown = f"{fmt_ms(v)} ms"
        elif r["unit"] == "×":
            shown = f"{v:.2f}×"
        else:
            shown = f"{v}/{r['limit']} {r['unit']}"
        lines.append(f"| {r['target']} | {r['backend']} | {shown} | {r['result']} | {r['note']} |")
    if unchecked:
        lines += ["", f"{len(unchecked)} target(s) not checked: their cells are not in this run."]
    return lines


def timing_tables(cells: list[dict[str, Any]], backends: list[str]) -> list[str]:
    """One table per method and kind: a row per ``(d, backend, mode)``, a column per batch."""
    lines: list[str] = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        groups[(c["method"], c["kind"])].append(c)
    idx = Index(cells)
    for method in METHOD_NAMES:
        for kind in ("diag", "full"):
            sub = groups.get((method, kind))
            if not sub:
                continue
            batches = sorted({c["batch"] for c in sub})
            dims = sorted({c["d"] for c in sub})
            modes = [m for m in MODE_NAMES if any(c["mode"] == m for c in sub)]
            lines += [f"### {METHOD_NAMES[method]}, {kind}", ""]
            head = "| d | backend | mode | " + " | ".join(f"B={fmt_batch(b)}" for b in batches)
            lines += [head + " |", "|---|---|---|" + "---:|" * len(batches)]
            for d in dims:
                for backend in backends:
                    for mode in modes:
                        row = [idx.get(method, kind, d, b, mode, backend) for b in batches]
                        if all(r is None for r in row):
                            continue
                        cols = " | ".join(cell_text(r) for r in row)
                        lines.append(f"| {d} | {backend} | {MODE_NAMES[mode]} | {cols} |")
            lines.append("")
    return lines


def _pair_table(
    cells: list[dict[str, Any]], pairs: list[tuple[str, str, str]], d: int, suffix: str
) -> list[str]:
    """A table of time ratios at one ``d``: for each ``(label, num, den)`` in ``pairs``, the
    median time of backend ``num`` over that of ``den``, per method, kind, mode and batch."""
    idx = Index(cells)
    batches = sorted({c["batch"] for c in cells if c["d"] == d})
    if not pairs or not batches:
        return []
    lines = [
        "| method | kind | mode | backend | "
        + " | ".join(f"B={fmt_batch(b)}" for b in batches)
        + " |",
        "|---|---|---|---|" + "---:|" * len(batches),
    ]
    for method in METHOD_NAMES:
        for kind in ("diag", "full"):
            for mode in MODE_NAMES:
                for label, num, den in pairs:
                    cols = []
                    for b in batches:
                        top = idx.get(method, kind, d, b, mode, num)
                        bottom = idx.get(method, kind, d, b, mode, den)
                        if top and bottom and top.get("status") == bottom.get("status") == "ok":
                            cols.append(f"{top['median_s'] / bottom['median_s']:.2f}{suffix}")
                        else:
                            cols.append("")
                    if any(cols):
                        lines.append(
                            f"| {METHOD_NAMES[method]} | {kind} | {MODE_NAMES[mode]} | {label} | "
                            + " | ".join(cols)
                            + " |"
                        )
    return lines


def baseline_table(cells: list[dict[str, Any]], backends: list[str], d: int = 6) -> list[str]:
    """Speed-up of this checkout over each baseline backend (``<backend>@REF``): the baseline's
    median time over the current one, per method, kind, mode and batch at one ``d``."""
    pairs = [(b.split("@")[0], b) for b in backends if "@" in b]
    return _pair_table(cells, [(cur, base, cur) for cur, base in pairs if cur in backends], d, "×")


def ratio_table(cells: list[dict[str, Any]], backends: list[str], d: int = 6) -> list[str]:
    """Time of every other backend over torch's, per method, kind and batch at one ``d``."""
    if "torch" not in backends:
        return []
    others = [b for b in backends if b != "torch" and "@" not in b and "+" not in b]
    return _pair_table(cells, [(other, other, "torch") for other in others], d, "")


def memory_table(cells: list[dict[str, Any]], backends: list[str]) -> list[str]:
    """Peak extra memory over input size at the largest batch of each ``(method, kind, d)``."""
    measured = [c for c in cells if c.get("mem_ratio") is not None]
    if not measured:
        return []
    mem_backends = [b for b in backends if any(c["backend"] == b for c in measured)]
    head = "| method | kind | d | B | " + " | ".join(
        f"{b} {MODE_NAMES[m]}" for b in mem_backends for m in MODE_NAMES
    )
    lines = [head + " |", "|---|---|---|---|" + "---:|" * (2 * len(mem_backends))]
    idx = Index(cells)
    for method in METHOD_NAMES:
        for kind in ("diag", "full"):
            for d in sorted({c["d"] for c in measured}):
                sub = [c for c in measured if (c["method"], c["kind"], c["d"]) == (method, kind, d)]
                if not sub:
                    continue
                batch = max(c["batch"] for c in sub)
                cols = []
                for b in mem_backends:
                    for m in MODE_NAMES:
                        c = idx.get(method, kind, d, batch, m, b)
                        r = None if c is None else c.get("mem_ratio")
                        cols.append("" if r is None else f"{r:.1f}")
                lines.append(
                    f"| {METHOD_NAMES[method]} | {kind} | {d} | {fmt_batch(batch)} | "
                    + " | ".join(cols)
                    + " |"
                )
    return lines


def render(result: dict[str, Any]) -> str:
    """The whole report as markdown."""
    m = result["machine"]
    s = result["settings"]
    backends = [b for b, info in result["backends"].items() if info.get("ready")]
    cells = result["cells"]
    lines = [
        f"## Benchmark: {result['label']} ({'quick' if s['quick'] else 'full'} run)",
        "",
        f"- date: {result['date']}; tr_projections {m['tr_projections']} (git {m['git']})",
        f"- machine: {m['cpu']}, {m['cpus']} logical CPUs ({m['cpus_usable']} usable), "
        f"{m['memory_gb']} GB RAM; {m['platform']}",
        f"- threads: {s['threads']} (torch.set_num_threads, OMP/MKL/OpenBLAS env vars, CPU "
        f"affinity), OMP_WAIT_POLICY={s.get('omp_wait_policy') or 'unset'}, JAX XLA_FLAGS "
        f"{s.get('xla_flags') or 'unchanged'}; worker environment "
        + (", ".join(f"{k}={v}" for k, v in (s.get("worker_env") or {}).items()) or "unchanged")
        + f"; load average "
        f"{m['load_start']} at start, {m['load_end']} at end",
        f"- python {m['python']}; "
        + ", ".join(f"{k} {v}" for k, v in sorted(m["packages"].items()) if v),
    ]
    for name, b in result["backends"].items():
        grad = "gradients yes" if b.get("backward") else "gradients n/a"
        if not b.get("ready", True):
            grad = f"not available: {b.get('error')}"
        own = f", in {b['dtype']} (TRP_BENCH_DTYPE)" if b.get("dtype") else ""
        lines.append(f"- backend {name}: device {b.get('device', '?')}, {grad}{own}")
    dtype = s.get("dtype", "float64")
    if dtype != "float64":
        dtype += " (rounded from the float64 data; the issue's targets are stated for float64)"
    fracs = [c["frac_projected"] for c in cells if c.get("frac_projected") is not None]
    frac = f"{min(fracs):.0%}–{max(fracs):.0%}" if fracs else "?"
    lines += [
        f"- {dtype}; bounds at the {s['bound_quantile']:g} quantile of each distance part "
        f"({frac} of the states outside at least one bound); "
        f"median (IQR) of {s['min_repeat']}–{s['max_repeat']} timed runs after "
        f"{s['warmup']} warm-up, about {s['budget_s']:g} s per cell; times in ms; "
        "`*` = slow cell with fewer runs; JAX jitted, compilation excluded",
        "",
        "### Targets",
        "",
        *targets_table(result["targets"]),
        "",
    ]
    speedups = baseline_table(cells, backends)
    if speedups:
        lines += [
            f"### Speed-up over the baseline git {s.get('baseline')} (d=6, same run)",
            "",
            "Baseline median time over this checkout's; backends `<name>@REF` in the tables below "
            "are the baseline.",
            "",
            *speedups,
            "",
        ]
    for variant in [b for b in backends if b.endswith("+env")]:
        base = variant.removesuffix("+env")
        env = ", ".join(f"{k}={v}" for k, v in (s.get("variant_env") or {}).items())
        lines += [
            f"### Speed-up of {base} with the variant environment (d=6, same run)",
            "",
            f"{base}'s median time over that of `{variant}` ({env}), timed interleaved.",
            "",
            *_pair_table(cells, [(variant, base, variant)], 6, "×"),
            "",
        ]
    ratios = ratio_table(cells, backends)
    if ratios:
        lines += ["### Time relative to torch (d=6)", "", *ratios, ""]
    lines += timing_tables(cells, backends)
    mem = memory_table(cells, backends)
    if mem:
        lines += [
            "### Peak extra memory (× input size, largest batch)",
            "",
            *mem,
            "",
            "NumPy: tracemalloc; torch CPU: profiler allocation events; torch CUDA: "
            "max_memory_allocated; CuPy: memory-pool growth. Outputs and gradients count as extra.",
            "",
        ]
    compiled: dict[str, list[float]] = {}
    for c in cells:
        if c.get("compile_s") is not None:
            compiled.setdefault(c["backend"], []).append(c["compile_s"])
    for backend, compiles in sorted(compiled.items()):
        compiles.sort()
        what = "JAX compilation" if backend.startswith("jax") else f"Compilation of {backend}"
        lines += [
            f"{what} (excluded above): median {compiles[len(compiles) // 2]:.2f} s, "
            f"max {compiles[-1]:.2f} s per cell.",
            "",
        ]
    other = [c for c in cells if c.get("status") in ("skipped", "error", "n/a")]
    if other:
        reasons: dict[str, int] = defaultdict(int)
        for c in other:
            reasons[f"{c['status']}: {c.get('note', '')}"[:160]] += 1
        lines += ["Cells not timed:", ""]
        lines += [f"- {n} × {r}" for r, n in sorted(reasons.items())]
        lines.append("")
    return "\n".join(lines)
