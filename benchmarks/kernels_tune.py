"""Launch-parameter sweep for the RMSNorm, RoPE and GLU kernels (CUDA only).

    python benchmarks/kernels_tune.py

For each candidate setting it swaps the kernel module's launch policy (``module._LAUNCH``, a
:class:`lightning_fastft.kernels._launch.LaunchPolicy`), then prints the fastft GPU times
(CUDA-graph replays, :func:`harness.kernel_times`) at the benchmark shapes, so the module defaults
can be set to the fastest. The original policies are restored afterwards; nothing is written to
the modules' files.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import kernels_glu_ce  # noqa: E402
import kernels_norm_rope  # noqa: E402


def _fastft_rows(kernel: str, cases: Callable, sizes: Iterable[int]) -> list[tuple]:
    rows = []
    for size in sizes:
        for impl, shape, make_inputs, forward, grads_for, bytes_fwd, bytes_bwd, overhead in cases(size):
            if impl != "fastft":
                continue
            measured = harness.kernel_times(make_inputs, forward, grads_for, bytes_fwd, bytes_bwd, overhead)
            rows.append((kernel, shape, measured["fwd_ms"], measured["bwd_ms"]))
    return rows


def sweep(module_name: str, settings: Iterable[dict], kernel: str, cases: Callable, sizes: Iterable[int]) -> None:
    """For each ``settings`` (``LaunchPolicy`` fields over the module's own policy): set
    ``module._LAUNCH``, print the fastft rows; restore the original policy at the end."""
    module = importlib.import_module(module_name)
    original = module._LAUNCH
    try:
        for fields in settings:
            module._LAUNCH = dataclasses.replace(original, **fields)
            label = " ".join(f"{key}={value}" for key, value in fields.items())
            for row in _fastft_rows(kernel, cases, sizes):
                print(f"{kernel} {label}", *row, flush=True)
    finally:
        module._LAUNCH = original


def main() -> None:
    sweep(
        "lightning_fastft.kernels.rms_norm",
        [{"programs_per_sm": per_sm, "num_warps": warps} for per_sm in (1, 2, 4, 8) for warps in (4, 8, 16)],
        "rms_norm", kernels_norm_rope.rms_norm_cases, kernels_norm_rope.SEQ_LENS,
    )  # fmt: skip
    sweep(
        "lightning_fastft.kernels.rope",
        [{"num_warps": warps} for warps in (1, 2, 4, 8)],
        "rope", kernels_norm_rope.rope_cases, kernels_norm_rope.SEQ_LENS,
    )  # fmt: skip
    sweep(
        "lightning_fastft.kernels.glu",
        [{"max_block": block, "num_warps": warps} for block in (1024, 2048, 4096, 8192) for warps in (4, 8, 16)],
        "glu", lambda tokens: kernels_glu_ce.glu_cases(tokens, "silu"), kernels_glu_ce.GLU_TOKENS,
    )  # fmt: skip


if __name__ == "__main__":
    main()
