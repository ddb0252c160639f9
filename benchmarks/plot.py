"""Plot time against batch size from a results JSON of ``run.py`` (needs matplotlib).

    python benchmarks/plot.py benchmarks/results/cpu-2core-2026-11-26.json
    python benchmarks/plot.py RESULTS.json --dim 6 --out docs/img/benchmarks.png

One log-log line per method, kind and backend at one dimension ``d`` (default 6): forward +
backward where gradients ran, forward otherwise (dashed-dotted and marked "fwd" in the legend);
a ``--baseline`` backend (``torch@REF``) is dotted.
Error bars show the interquartile range.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHOD_NAMES = {"kl": "KL", "frobenius": "Frobenius", "wasserstein": "W2"}
COLORS = {"kl": "tab:blue", "frobenius": "tab:orange", "wasserstein": "tab:green"}
MARKERS = {
    "numpy": "o",
    "torch": "s",
    "jax": "^",
    "cupy": "D",
    "torch_cuda": "s",
    "jax_cuda": "^",
}


def series(cells: list[dict], d: int) -> dict[tuple[str, str, str], tuple[str, list[dict]]]:
    """``(method, kind, backend) -> (mode, cells sorted by batch)`` at dimension ``d``."""
    ok = [c for c in cells if c["d"] == d and c.get("status") == "ok"]
    out = {}
    for key in sorted({(c["method"], c["kind"], c["backend"]) for c in ok}):
        for mode in ("backward", "forward"):
            sub = sorted(
                (
                    c
                    for c in ok
                    if (c["method"], c["kind"], c["backend"]) == key and c["mode"] == mode
                ),
                key=lambda c: c["batch"],
            )
            if sub:
                out[key] = (mode, sub)
                break
    return out


def plot(result: dict, d: int, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = series(result["cells"], d)
    if not data:
        raise SystemExit(f"no timed cells at d={d} in the results")
    kinds = sorted({k for _, k, _ in data})
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.0 * len(kinds), 4.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for (method, k, backend), (mode, sub) in data.items():
            if k != kind:
                continue
            x = [c["batch"] for c in sub]
            y = [c["median_s"] * 1e3 for c in sub]
            err = [
                [max(c["median_s"] - c["q1_s"], 0) * 1e3 for c in sub],
                [max(c["q3_s"] - c["median_s"], 0) * 1e3 for c in sub],
            ]
            label = f"{METHOD_NAMES.get(method, method)}, {backend}"
            if mode == "forward":
                label += " (fwd)"
            ax.errorbar(
                x,
                y,
                yerr=err,
                color=COLORS.get(method),
                marker=MARKERS.get(backend.split("@")[0], "x"),
                # a baseline (run.py --baseline, backend "name@REF") is dotted
                linestyle=":" if "@" in backend else ("-" if mode == "backward" else "-."),
                alpha=0.6 if "@" in backend else 1.0,
                capsize=2,
                label=label,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel("time [ms] (median, IQR bars)")
        ax.set_title(f"{kind} Gaussians, d={d}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    m, s = result["machine"], result["settings"]
    fig.suptitle(
        f"tr_projections {m.get('tr_projections', '')} ({m.get('git', '')}): forward + backward, "
        f"float64, {s['threads']} threads, {m['cpu']} — {result['label']}",
        fontsize=9,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="a JSON file written by benchmarks/run.py")
    p.add_argument("--dim", type=int, default=6, help="the dimension d to plot")
    p.add_argument(
        "--out", type=Path, help="PNG path (default docs/img/benchmarks-<results name>.png)"
    )
    args = p.parse_args(argv)
    result = json.loads(args.results.read_text())
    out = args.out or HERE.parent / "docs" / "img" / f"benchmarks-{args.results.stem}.png"
    print(plot(result, args.dim, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
