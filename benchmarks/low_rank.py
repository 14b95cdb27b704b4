"""GPU micro-benchmark: LoRA's rank-r update ``y += s a b^T`` by cuBLAS (``addmm_``) and by
``lightning_fastft.kernels.low_rank.add_low_rank_``, over the kernel's tile settings, at the
Llama-3-8B LoRA shapes (tokens x output width 1024 / 4096 / 14336, rank 16, bf16):

    . benchmarks/gpu_env.sh
    python benchmarks/low_rank.py --out benchmarks/results/low_rank_h200.json

Both read and write ``y`` once; the rate column counts those bytes (2 x y's size) per second. Each row
also gives the largest difference from ``addmm_``'s result in units of y's largest value.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from lightning_fastft.kernels import low_rank  # noqa: E402

TILES = ((64, 128, 4), (64, 256, 4), (128, 128, 8), (128, 256, 8), (32, 256, 4), (64, 64, 4), (128, 64, 4))
COLUMNS = ("tokens", "width", "way", "block_m", "block_n", "num_warps", "ms", "tb_per_s", "vs_addmm", "max_diff")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 2048], help="bs 4 and bs 1 at seq 2048")
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 4096, 14336])
    parser.add_argument("--rank", type=int, default=harness.LORA_R)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    chosen = (low_rank.BLOCK_M, low_rank.BLOCK_N, low_rank.NUM_WARPS)
    for tokens in args.tokens:
        for width in args.widths:
            start = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
            y = start.clone()  # timed in place: its values drift, ``start`` stays for the comparisons
            a = torch.randn(tokens, args.rank, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(width, args.rank, device="cuda", dtype=torch.bfloat16)
            expected = low_rank.add_low_rank_reference(start.clone(), a, b, 2.0)
            gigabytes = 2 * y.numel() * y.element_size() / 1e9
            base_ms = harness.launch_ms(lambda: low_rank.add_low_rank_reference(y, a, b, 2.0))
            rows.append({"tokens": tokens, "width": width, "way": "addmm_", "ms": base_ms,
                         "tb_per_s": gigabytes / base_ms, "vs_addmm": 1.0})  # fmt: skip
            for tile in TILES:
                low_rank.BLOCK_M, low_rank.BLOCK_N, low_rank.NUM_WARPS = tile
                result = low_rank.add_low_rank_(start.clone(), a, b, 2.0)
                ms = harness.launch_ms(lambda: low_rank.add_low_rank_(y, a, b, 2.0))
                rows.append({
                    "tokens": tokens, "width": width, "way": "add_low_rank_" + (" (chosen)" if tile == chosen else ""),
                    "block_m": tile[0], "block_n": tile[1], "num_warps": tile[2], "ms": ms,
                    "tb_per_s": gigabytes / ms, "vs_addmm": base_ms / ms,
                    "max_diff": ((result.float() - expected.float()).abs().max() / expected.float().abs().max()).item(),
                })  # fmt: skip
            low_rank.BLOCK_M, low_rank.BLOCK_N, low_rank.NUM_WARPS = chosen
            print(harness.markdown_table(rows[-len(TILES) - 1 :], COLUMNS), flush=True)
    notes = ["tb_per_s: 2 x y's bytes (read and written) per second; vs_addmm: addmm_'s time / this row's time."]
    harness.write_results(args.out, "LoRA's rank-r update: addmm_ vs add_low_rank_", harness.run_meta(), rows, COLUMNS, notes)


if __name__ == "__main__":
    main()
