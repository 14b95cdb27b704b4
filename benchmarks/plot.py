"""Bar charts of training-benchmark results: tokens/s and peak GPU memory per variant.

    python benchmarks/plot.py benchmarks/results/train_partA_run3.json [more.json ...] [--out chart.png]

Reads the JSON written by ``benchmarks/train_bench.py``; one group of bars per
(shape, quant, seq_len) run, one bar per variant that finished. Default output: the first JSON's
path with ``.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

METRICS = (("tokens_per_sec", "tokens/s (higher is better)"), ("peak_mem_gib", "peak GPU memory, GiB (lower is better)"))


def run_label(row: dict) -> str:
    return f"{row['shape']} {row.get('quant') or 'bf16'} seq {row['seq_len']}"


def plot_results(rows: list[dict], out: Path) -> Path:
    """Write the PNG of the ``status == "ok"`` rows to ``out``; returns ``out``."""
    rows = [row for row in rows if row.get("status") == "ok"]
    if not rows:
        raise ValueError("no successful benchmark rows to plot")
    runs = list(dict.fromkeys(run_label(row) for row in rows))
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    width = 0.8 / len(variants)
    figure, axes = plt.subplots(1, len(METRICS), figsize=(6 * len(METRICS), 4.5))
    for axis, (metric, title) in zip(axes, METRICS):
        for v, variant in enumerate(variants):
            values = {run_label(r): r.get(metric) for r in rows if r["variant"] == variant}
            positions = [i + (v - (len(variants) - 1) / 2) * width for i, run in enumerate(runs) if values.get(run)]
            heights = [values[run] for run in runs if values.get(run)]
            bars = axis.bar(positions, heights, width, label=variant)
            axis.bar_label(bars, fmt="%.0f" if metric == "tokens_per_sec" else "%.1f", fontsize=7)
        axis.set_xticks(range(len(runs)), runs, fontsize=8)
        axis.set_title(title)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Plot train_bench.py results (tokens/s, peak memory).")
    parser.add_argument("results", nargs="+", type=Path, help="JSON files written by train_bench.py")
    parser.add_argument("--out", type=Path, help="PNG path (default: the first JSON with .png)")
    args = parser.parse_args(argv)
    rows = [row for path in args.results for row in harness.load_results(path)[1]]
    print(plot_results(rows, args.out or args.results[0].with_suffix(".png")))


if __name__ == "__main__":
    main()
