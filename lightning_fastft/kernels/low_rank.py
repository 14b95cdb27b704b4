"""LoRA's low-rank update added in place: ``y += s a b^T`` as one Triton kernel.

``y`` is (M, N) -- a projection's output, or an input gradient -- ``a`` is (M, r) and ``b`` is (N, r)
with a small rank ``r``: the ``s (x A^T) B^T`` term of a LoRA forward (``a = x A^T``, ``b = B``) and
the ``dxa A`` term of its input gradient (``a = dxa``, ``b = A^T``). The product has no reduction
worth a GEMM: its cost is reading and writing ``y``. cuBLAS runs ``y.addmm_(a, b.t(), alpha=s)``
as a K = r GEMM at about 2.3 TB/s on an H200 (``benchmarks/results/low_rank_h200.md``); this kernel
streams ``y`` once, one (BLOCK_M, BLOCK_N) tile per program, the tile's ``a`` rows and ``b`` rows
loaded beside it (r <= 64 in one ``tl.dot``, larger ranks in chunks of 64).

Numerics as ``addmm_``: the products accumulate in fp32 (bf16 inputs through a TF32 dot, which holds
their 8-bit significands exactly; fp16 and fp32 inputs through a full fp32 one), ``y + s * acc`` is
formed in fp32 and rounded once to ``y``'s dtype. ``a`` and ``b`` must have
``y``'s dtype (the LoRA Functions cast their weights to the compute dtype first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime import triton_enabled, warn_fallback
from ._launch import launch

BLOCK_M, BLOCK_N, NUM_WARPS = 64, 128, 4
"""Tile and warps of the kernel (measured: ``benchmarks/low_rank.py``)."""
MAX_RANK_CHUNK = 64
"""Rank columns one ``tl.dot`` takes; a larger rank loops over chunks of this many."""


def add_low_rank_reference(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``y += scale * a @ b^T`` in place by ``torch.addmm_`` (the op without Triton); returns ``y``."""
    return y.addmm_(a, b.t(), alpha=scale)


def add_low_rank_(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``y += scale * a @ b^T`` in place for a 2-D ``y`` (M, N), ``a`` (M, r), ``b`` (N, r), all of one
    dtype and device (any strides); returns ``y``. No autograd: for use inside autograd Functions."""
    if y.dim() != 2 or a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"add_low_rank_ takes 2-D tensors, got y {tuple(y.shape)}, a {tuple(a.shape)}, b {tuple(b.shape)}")
    if a.shape[0] != y.shape[0] or b.shape[0] != y.shape[1] or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"add_low_rank_ needs y (M, N), a (M, r), b (N, r); got y {tuple(y.shape)}, a {tuple(a.shape)}, "
            f"b {tuple(b.shape)}"
        )
    if not (y.dtype == a.dtype == b.dtype):
        raise TypeError(f"add_low_rank_ needs one dtype, got y {y.dtype}, a {a.dtype}, b {b.dtype}")
    if not triton_enabled(y, a, b):
        warn_fallback("add_low_rank_")
        return add_low_rank_reference(y, a, b, scale)
    m, n = y.shape
    rank = a.shape[1]
    if m == 0 or n == 0 or rank == 0:
        return y
    block_r = min(MAX_RANK_CHUNK, max(16, triton.next_power_of_2(rank)))
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    launch(
        _add_low_rank_kernel, grid,
        y, a, b, y.stride(0), y.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1), m, n, rank, float(scale),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=block_r, INPUT_PRECISION="tf32" if y.dtype == torch.bfloat16 else "ieee", num_warps=NUM_WARPS,
    )  # fmt: skip
    return y


@triton.jit
def _add_low_rank_kernel(
    y_ptr, a_ptr, b_ptr,
    stride_ym, stride_yn, stride_am, stride_ar, stride_bn, stride_br,
    m, n, rank, scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of ``y += scale * a b^T``: acc = sum over rank chunks of
    a[rows, chunk] b[cols, chunk]^T in fp32, then y = round(y + scale * acc)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < m
    col_mask = cols < n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, rank, BLOCK_R):
        ranks = start + tl.arange(0, BLOCK_R)
        rank_mask = ranks < rank
        a = tl.load(
            a_ptr + rows[:, None] * stride_am + ranks[None, :] * stride_ar,
            mask=row_mask[:, None] & rank_mask[None, :], other=0.0,
        )  # fmt: skip
        b = tl.load(
            b_ptr + ranks[:, None] * stride_br + cols[None, :] * stride_bn,
            mask=rank_mask[:, None] & col_mask[None, :], other=0.0,
        )  # fmt: skip
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=INPUT_PRECISION)
    mask = row_mask[:, None] & col_mask[None, :]
    pointers = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    y = tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
    result = y + scale * acc
    if y_ptr.dtype.element_ty == tl.bfloat16:
        result = _round_to_bfloat16(result)
    tl.store(pointers, result.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _round_to_bfloat16(value):
    """``value`` (fp32) rounded to the nearest bfloat16, ties to even, still as fp32 (so the cast that
    follows is exact: the Triton interpreter's cast truncates, the GPU's rounds; both give this).
    NaNs pass unchanged."""
    bits = value.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(value == value, rounded.to(tl.float32, bitcast=True), value)
