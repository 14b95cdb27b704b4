"""Launch-parameter sweep for the RMSNorm, RoPE and GLU kernels (CUDA only).

    python benchmarks/kernels_tune.py

For each candidate setting it patches the kernel module's launch helpers, then prints the
fastft GPU times (CUDA-graph replays, :func:`kernels_timing.measure`) at the benchmark shapes,
so the module defaults can be set to the fastest. Nothing is written to the modules' files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import kernels_glu_ce  # noqa: E402
import kernels_norm_rope  # noqa: E402


def _fastft_rows(kernel: str, cases, sizes) -> list[tuple]:
    from kernels_timing import measure

    rows = []
    for size in sizes:
        for impl, shape, make_inputs, forward, grads_for, bytes_fwd, bytes_bwd, overhead in cases(size):
            if impl != "fastft":
                continue
            measured = measure(make_inputs, forward, grads_for, bytes_fwd, bytes_bwd, overhead)
            rows.append((kernel, shape, measured["fwd_ms"], measured["bwd_ms"]))
    return rows


def _glu_cases(tokens: int):
    from lightning_fastft.kernels.glu import glu

    shape = (tokens, kernels_glu_ce.GLU_INTERMEDIATE)

    def make_inputs():
        gate = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        return gate, torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    n_bytes = tokens * kernels_glu_ce.GLU_INTERMEDIATE * 2
    yield "fastft", shape, make_inputs, lambda g, u: glu(g, u, "silu"), torch.randn_like, 3 * n_bytes, 5 * n_bytes, 0.0


def main() -> None:
    from lightning_fastft.kernels import glu, rms_norm, rope

    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    original_rms_programs, original_rms_warps = rms_norm._num_backward_programs, rms_norm._num_warps
    for per_sm in (1, 2, 4, 8):
        for warps in (4, 8, 16):
            rms_norm._num_backward_programs = lambda n_rows, device, per_sm=per_sm: max(1, min(n_rows, per_sm * sm_count))
            rms_norm._num_warps = lambda block, warps=warps: warps
            for row in _fastft_rows("rms_norm", kernels_norm_rope._rms_norm_cases, kernels_norm_rope.SEQ_LENS):
                print(f"rms_norm programs/SM={per_sm} warps={warps}", *row, flush=True)
    rms_norm._num_backward_programs, rms_norm._num_warps = original_rms_programs, original_rms_warps

    for warps in (1, 2, 4, 8):
        rope._ROPE_NUM_WARPS = warps
        for row in _fastft_rows("rope", kernels_norm_rope._rope_cases, kernels_norm_rope.SEQ_LENS):
            print(f"rope warps={warps}", *row, flush=True)

    original_block = glu._MAX_BLOCK
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            glu._MAX_BLOCK = block
            glu._num_warps = lambda block, warps=warps: warps
            for row in _fastft_rows("glu", _glu_cases, kernels_glu_ce.GLU_TOKENS):
                print(f"glu block={block} warps={warps}", *row, flush=True)
    glu._MAX_BLOCK = original_block


if __name__ == "__main__":
    main()
