"""Kernel micro-benchmarks (CUDA): every kernel vs PyTorch eager and Liger-Kernel, one table.

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels_h100.json

Writes the JSON rows and a Markdown table beside them (same stem, ``.md``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback
from pathlib import Path

import torch

SUITES = ("kernels_norm_rope", "kernels_glu_ce", "kernels_lora")
COLUMNS = ("kernel", "shape", "dtype", "impl", "fwd_ms", "bwd_ms", "fwd_launch_ms", "bwd_launch_ms", "fwd_gbps", "bwd_gbps", "peak_mib")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if value < 100 else f"{value:.0f}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--suites", nargs="*", default=SUITES)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    rows: list[dict] = []
    for suite in args.suites:
        try:
            importlib.import_module(suite).run(rows)
        except Exception:  # one broken suite must not hide the others' numbers
            traceback.print_exc()
            rows.append({"kernel": suite, "impl": "FAILED"})
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown_table(rows)
    args.out.with_suffix(".md").write_text(f"{meta}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
