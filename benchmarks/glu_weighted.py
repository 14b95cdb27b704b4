"""GPU timing of the mixture-of-experts GLU backward with routing weights (``glu_backward_weighted``)
against the plain GLU backward of the same rows, at the expert widths of Qwen3-MoE (768), gpt-oss-like
(2880) and Mixtral (14336), 8192 tokens routed top-k. The weighted kernel runs one program per row;
``block`` is the policy it runs under: the capped one (rows wider than the cap walked a block at a
time) or the whole row in one block (``--whole-row``, how it ran before the cap).

Both kernels read dh, gate and up and write dgate, dup and h: ``gbps`` is those six tensors' bytes over
the median time (``triton.testing.do_bench``). Run: ``python benchmarks/glu_weighted.py [--out PATH]``
(PATH and PATH.md; default ``benchmarks/results/glu_weighted``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from lightning_fastft.kernels._launch import LaunchPolicy  # noqa: E402
from lightning_fastft.kernels.glu import glu_backward, glu_backward_weighted  # noqa: E402

glu_module = importlib.import_module("lightning_fastft.kernels.glu")
SHAPES = {"qwen3_moe": (8192 * 8, 768), "gpt_oss_like": (8192 * 4, 2880), "mixtral": (8192 * 2, 14336)}
COLUMNS = ["shape", "rows", "cols", "impl", "block", "ms", "gbps"]


def run(policies: dict[str, LaunchPolicy]) -> list[dict]:
    rows_out = []
    for name, (rows, cols) in SHAPES.items():
        dh, gate, up = (torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        weights = torch.rand(rows, device="cuda")
        out = (torch.empty_like(gate), torch.empty_like(up))
        nbytes = 6 * rows * cols * dh.element_size()
        cases = {"plain": lambda: glu_backward(dh, gate, up, "silu", out=out, return_h=True)}
        for label, policy in policies.items():
            cases[f"weighted_{label}"] = (policy, lambda: glu_backward_weighted(dh, gate, up, weights, "silu", out=out))
        for impl, case in cases.items():
            policy, function = case if isinstance(case, tuple) else (glu_module._LAUNCH, case)
            saved, glu_module._LAUNCH = glu_module._LAUNCH, policy
            try:
                ms = triton.testing.do_bench(function, warmup=25, rep=100)
            finally:
                glu_module._LAUNCH = saved
            block = policy.settings(cols)[0]
            rows_out.append({"shape": name, "rows": rows, "cols": cols, "impl": impl, "block": block,
                             "ms": ms, "gbps": nbytes / ms / 1e6})  # fmt: skip
        del dh, gate, up, out
        torch.cuda.empty_cache()
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=harness.RESULTS_DIR / "glu_weighted")
    args = parser.parse_args()
    rows = run({"capped": glu_module._LAUNCH, "whole_row": LaunchPolicy()})
    title = "MoE GLU backward with routing weights vs the plain GLU backward (bf16, SiLU)"
    harness.write_results(args.out, title, harness.run_meta(), rows, COLUMNS)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
