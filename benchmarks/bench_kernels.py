"""Kernel micro-benchmarks (CUDA): every kernel vs PyTorch eager and Liger-Kernel, one table.

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels_h100.json

Writes the JSON rows and a Markdown table beside them (same stem, ``.md``; ``harness.write_results``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SUITES = ("kernels_norm_rope", "kernels_glu_ce", "kernels_lora")
COLUMNS = harness.KERNEL_COLUMNS
NOTES = (
    "Timing (see `harness.kernel_times`). rms_norm, rope, swiglu, geglu_tanh: fwd_ms/bwd_ms are GPU",
    "times from CUDA-graph replays over rotating input sets (no CPU launch overhead, L2 defeated); fwd_launch_ms /",
    "bwd_launch_ms are do_bench times of the same pass launched from Python (at these sizes mostly CPU/autograd",
    "overhead, noisy). bwd = (fwd+bwd) - fwd. rope fastft rotates a clone of the leaf inputs (a model rotates its",
    "projection outputs); the clone's GPU time is subtracted from bwd_ms but its memory is in peak_mib.",
    "linear_ce_*, lora_*, dequantize_nf4: do_bench medians (`harness.launched_time_and_memory`, GPU-bound sizes);",
    "fwd_ms there includes autograd recording; the fused CE computes its gradients in the forward.",
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--suites", nargs="*", default=SUITES)
    args = parser.parse_args(argv)
    rows: list[dict] = []
    for suite in args.suites:
        try:
            importlib.import_module(suite).run(rows)
        except Exception:  # one broken suite must not hide the others' numbers
            traceback.print_exc()
            rows.append({"kernel": suite, "impl": "FAILED"})
    harness.write_results(
        args.out, "Kernel micro-benchmarks", harness.run_meta(), rows, COLUMNS, notes=NOTES, integers_from=100
    )
    print(harness.markdown_table(rows, COLUMNS, integers_from=100))


if __name__ == "__main__":
    main()
