"""Throughput and latency against concurrency (or request rate), one line per series.

Reads the results JSON of serve_bench.py or run_all.py:

    python -m bench.plot results.json [out.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PANELS = [
    ("output_throughput", None, "output tokens/s", "Throughput (higher is better)"),
    ("ttft_ms", ("p50", "p99"), "ms", "Time to first token"),
    ("tpot_ms", ("p50", "p99"), "ms", "Time per output token (after the first)"),
    ("e2el_ms", ("p50", "p99"), "ms", "End-to-end latency"),
]


def _x(run: dict) -> float:
    return run["concurrency"] if run["mode"] == "concurrency" else run["request_rate"]


def plot_results(results: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict]] = results["series"]
    modes = {run["mode"] for runs in series.values() for run in runs}
    xlabel = "concurrent clients" if modes == {"concurrency"} else "request rate (req/s)"
    figure, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    xs_all = sorted({_x(run) for runs in series.values() for run in runs if _x(run) is not None})
    for axis, (metric, stats, unit, title) in zip(axes.flat, PANELS):
        for number, (label, runs) in enumerate(series.items()):
            runs = sorted((r for r in runs if r.get("completed")), key=_x)
            if not runs:
                continue
            color = colors[number % len(colors)]
            xs = [_x(r) for r in runs]
            for stat, style in zip(stats or (None,), ("-o", "--s")):
                ys = [r[metric] if stat is None else r[metric][stat] for r in runs]
                name = label if stat is None else f"{label} {stat}"
                axis.plot(xs, ys, style, color=color, label=name, markersize=5)
                if len(xs) == 1 and len(xs_all) > 1 and metric == "output_throughput":
                    # a single point (the one-at-a-time baseline): a reference line across the plot
                    axis.axhline(ys[0], color=color, linestyle=":", linewidth=1)
        if metric == "output_throughput":
            roofline = (results.get("roofline") or {}).get("max_decode_tokens_per_s")
            if roofline:
                axis.axhline(
                    roofline,
                    color="gray",
                    linestyle="-.",
                    linewidth=1,
                    label=f"single-stream roofline {roofline:.1f} tok/s",
                )
        else:
            axis.set_yscale("log")
        if xs_all and min(xs_all) > 0:
            axis.set_xscale("log", base=2)
            axis.set_xticks(xs_all)
            axis.set_xticklabels([f"{x:g}" for x in xs_all])
        axis.set_title(title)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(unit)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    model = results.get("model") or {}
    shape = f"OpenELM {model.get('parameters', 0) / 1e6:.0f}M-param shape" if model.get("parameters") else ""
    machine = results.get("machine") or {}
    where = machine.get("gpu") or f"{machine.get('cpu_count')} CPU cores"
    figure.suptitle(
        f"{shape}, {results.get('dtype', '')} on {where} — {results.get('date', '')}".strip(" ,"), fontsize=11
    )
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    source = Path(argv[0])
    out = Path(argv[1]) if len(argv) > 1 else source.with_suffix(".png")
    plot_results(json.loads(source.read_text()), out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
