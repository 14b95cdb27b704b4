"""Grouped matrix products for mixture-of-experts layers: one launch for all experts.

Rows of ``x`` are sorted by expert; ``offsets`` (int32, one per expert) holds the cumulative end
row of each expert's group, as ``torch._grouped_mm`` takes it. An expert with no rows has an
empty group (equal consecutive offsets).

* :func:`grouped_mm`: ``y[s] = x[s] @ m[e(s)]`` for each row ``s`` of expert ``e(s)``, with
  ``m`` of shape (experts, K, N) in any strides (a weight stored (experts, N, K) is passed as its
  ``transpose(1, 2)`` view, never copied). An optional second pair adds
  ``scale2 * x2[s] @ m2[e(s)]`` in the same launch: the LoRA term
  ``(x A_e^T) B_e^T`` accumulates into the base product's tile before the single store. An
  optional ``bias`` (experts, N) adds ``bias[e(s)]`` there too.
* :func:`grouped_mm_weight_grad`: ``g[e] = dy[rows of e]^T @ x[rows of e]`` of shape
  (experts, N, K), zero for an expert with no rows: the weight gradient of ``y = x @ W_e^T``.

Both accumulate in fp32 and round once to the output dtype. The grouped product's programs
walk the row tiles of every expert laid end to end (at most ``cdiv(rows, BLOCK_M) + experts``
of them), each finding its expert and rows from ``offsets`` on the device: no host
synchronisation, no tile map built per call. On CUDA with bf16 ``x`` and ``m`` and a torch
that has ``torch._grouped_mm`` (compute capability 9.0 or later), :func:`grouped_mm` runs the
base product by that, and the Triton kernel adds the second pair and the bias to its bf16 result
in place (so ``y = round(round(x m) + scale2 x2 m2 + bias)``: the base rounded first, as PEFT adds
a LoRA term to its base layer's output); the weight gradient always runs the Triton kernel.
Operands of mixed dtypes (bf16 rows, fp32 LoRA factors) multiply in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime import triton_enabled, warn_fallback
from ._launch import launch


def grouped_mm_reference(
    x: torch.Tensor,
    m: torch.Tensor,
    offsets: torch.Tensor,
    x2: torch.Tensor | None = None,
    m2: torch.Tensor | None = None,
    scale2: float = 1.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`grouped_mm` in PyTorch, one matmul per expert group (fp32 accumulation)."""
    _check(x, m, offsets, x2, m2, bias)
    y = torch.empty(x.shape[0], m.shape[2], dtype=x.dtype, device=x.device)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        out = x[start:end].float() @ m[e].float()
        if x2 is not None:
            out = out + scale2 * (x2[start:end].float() @ m2[e].float())
        if bias is not None:
            out = out + bias[e].float()
        y[start:end] = out.to(y.dtype)
        start = end
    return y


def grouped_mm_weight_grad_reference(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """:func:`grouped_mm_weight_grad` in PyTorch, one matmul per expert group."""
    g = torch.zeros(offsets.shape[0], dy.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        g[e] = (dy[start:end].float().t() @ x[start:end].float()).to(g.dtype)
        start = end
    return g


def _check(x, m, offsets, x2, m2, bias) -> None:
    if x.dim() != 2 or m.dim() != 3 or x.shape[1] != m.shape[1]:
        raise ValueError(f"grouped_mm: x must be (rows, K) and m (experts, K, N), got {tuple(x.shape)}, {tuple(m.shape)}")
    if offsets.dim() != 1 or offsets.shape[0] != m.shape[0]:
        raise ValueError(f"grouped_mm: offsets must hold one end row per expert ({m.shape[0]}), got {tuple(offsets.shape)}")
    if (x2 is None) != (m2 is None):
        raise ValueError("grouped_mm: x2 and m2 come together")
    if x2 is not None and (
        x2.shape[0] != x.shape[0] or m2.shape[0] != m.shape[0] or m2.shape[2] != m.shape[2] or x2.shape[1] != m2.shape[1]
    ):
        raise ValueError(
            f"grouped_mm: the second pair {tuple(x2.shape)} @ {tuple(m2.shape)} does not match "
            f"{tuple(x.shape)} @ {tuple(m.shape)}"
        )
    if bias is not None and bias.shape != (m.shape[0], m.shape[2]):
        raise ValueError(f"grouped_mm: bias must be (experts, N) = {(m.shape[0], m.shape[2])}, got {tuple(bias.shape)}")


def _use_torch_grouped_mm(*tensors: torch.Tensor) -> bool:
    """``torch._grouped_mm`` takes these: CUDA bf16, sm90+, 16-byte aligned strides."""
    if not hasattr(torch, "_grouped_mm") or not all(t.is_cuda and t.dtype == torch.bfloat16 for t in tensors):
        return False
    if torch.cuda.get_device_capability(tensors[0].device) < (9, 0):
        return False
    return all(
        1 in t.stride()[-2:] and all(s % 8 == 0 for s in t.stride() if s != 1) and t.data_ptr() % 16 == 0
        for t in tensors
    )


def _tiles(device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps); under the interpreter few, wide programs."""
    return (64, 128, 64, 8) if device.type == "cuda" else (32, 64, 64, 1)


def _dot_flags(a: torch.Tensor, b: torch.Tensor) -> tuple[str | None, bool]:
    """How ``tl.dot`` multiplies the pair ``a @ b``: ``(input_precision, upcast)``.

    Any fp32 operand: the products in full fp32 (``"ieee"``, no TF32); all 16-bit: the default.
    Upcast to fp32 first when the dtypes differ (bf16 rows, fp32 LoRA factors) and for 16-bit
    operands under the interpreter (its dot multiplies the raw bf16 bits as integers); exact
    either way: products of 16-bit floats are exact in fp32, and the GPU's tensor cores
    accumulate them in fp32 too."""
    precision = "ieee" if {a.dtype, b.dtype} & {torch.float32, torch.float64} else None
    return precision, a.dtype != b.dtype or (a.device.type == "cpu" and min(a.element_size(), b.element_size()) == 2)


@triton.jit
def _accumulate_tile(
    X, M, e, rows, row_mask, cols, col_mask, stride_xs, stride_xk, stride_me, stride_mk, stride_mn, K,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``x[rows] @ m[e][:, cols]`` in fp32 for one (BLOCK_M, BLOCK_N) tile, over K in BLOCK_K steps."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            X + rows[:, None] * stride_xs + ks[None, :] * stride_xk,
            mask=row_mask[:, None] & (ks[None, :] < K), other=0.0,
        )  # fmt: skip
        b = tl.load(
            M + e * stride_me + ks[:, None] * stride_mk + cols[None, :] * stride_mn,
            mask=(ks[:, None] < K) & col_mask[None, :], other=0.0,
        )  # fmt: skip
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _tile_rows(OFFSETS, tile, n_experts, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, first row, end row) of row tile ``tile`` when every expert's rows are cut into
    BLOCK_M tiles laid end to end (end == first: past the last tile). Read from the group ends
    alone, on the device: no tile map is built on the host."""
    es = tl.arange(0, BLOCK_E)
    valid = es < n_experts
    ends = tl.load(OFFSETS + es, mask=valid, other=0)
    starts = tl.load(OFFSETS + es - 1, mask=valid & (es > 0), other=0)
    tiles = tl.where(valid, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    tiles_through = tl.cumsum(tiles, 0)  # tiles of the experts up to and including each one
    e = tl.sum((tiles_through <= tile).to(tl.int32), 0)  # experts whose tiles all come before
    this = es == e
    first_tile = tl.sum(tl.where(this, tiles_through - tiles, 0), 0)
    row_start = tl.sum(tl.where(this, starts, 0), 0) + (tile - first_tile) * BLOCK_M
    row_end = tl.where(e < n_experts, tl.sum(tl.where(this, ends, 0), 0), row_start)
    return e, row_start, row_end


@triton.jit
def _grouped_mm_kernel(
    X, M, Y, X2, M2, BIAS, OFFSETS, n_experts,
    stride_xs, stride_xk, stride_me, stride_mk, stride_mn, stride_ys, stride_yn,
    stride_x2s, stride_x2k, stride_m2e, stride_m2k, stride_m2n, stride_be, stride_bn,
    N, K, K2, scale2,
    HAS_FIRST: tl.constexpr, HAS_SECOND: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION2: tl.constexpr, UPCAST2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert, row_start, row_end = _tile_rows(OFFSETS, tile, n_experts, BLOCK_M, BLOCK_E)
    if row_start < row_end:
        e = expert.to(tl.int64)
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        y_tile = Y + rows[:, None] * stride_ys + cols[None, :] * stride_yn
        y_mask = row_mask[:, None] & col_mask[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_FIRST:
            acc += _accumulate_tile(
                X, M, e, rows, row_mask, cols, col_mask, stride_xs, stride_xk, stride_me, stride_mk, stride_mn, K,
                INPUT_PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
        if HAS_SECOND:  # the LoRA term, accumulated apart and scaled once
            acc += scale2 * _accumulate_tile(
                X2, M2, e, rows, row_mask, cols, col_mask, stride_x2s, stride_x2k, stride_m2e, stride_m2k,
                stride_m2n, K2, INPUT_PRECISION2, UPCAST2, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
        if HAS_BIAS:
            bias = tl.load(BIAS + e * stride_be + cols * stride_bn, mask=col_mask, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        if ACCUMULATE:  # y already holds a product (torch._grouped_mm's): add to it, round once
            acc += tl.load(y_tile, mask=y_mask, other=0.0).to(tl.float32)
        tl.store(y_tile, acc.to(Y.dtype.element_ty), mask=y_mask)


@triton.jit
def _grouped_weight_grad_kernel(
    DY, X, G, OFFSETS,
    stride_dys, stride_dyn, stride_xs, stride_xk, stride_ge, stride_gn, stride_gk,
    N, K,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    e = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    start = tl.load(OFFSETS + e - 1, mask=e > 0, other=0)
    end = tl.load(OFFSETS + e)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for s0 in range(start, end, BLOCK_M):
        rows = s0 + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        dy = tl.load(
            DY + rows[:, None] * stride_dys + ns[None, :] * stride_dyn,
            mask=row_mask[:, None] & (ns[None, :] < N), other=0.0,
        )  # fmt: skip
        x = tl.load(
            X + rows[:, None] * stride_xs + ks[None, :] * stride_xk,
            mask=row_mask[:, None] & (ks[None, :] < K), other=0.0,
        )  # fmt: skip
        if UPCAST:
            dy, x = dy.to(tl.float32), x.to(tl.float32)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=INPUT_PRECISION)
    tl.store(
        G + e.to(tl.int64) * stride_ge + ns[:, None] * stride_gn + ks[None, :] * stride_gk,
        acc.to(G.dtype.element_ty),
        mask=(ns[:, None] < N) & (ks[None, :] < K),
    )


def grouped_mm(
    x: torch.Tensor,
    m: torch.Tensor,
    offsets: torch.Tensor,
    x2: torch.Tensor | None = None,
    m2: torch.Tensor | None = None,
    scale2: float = 1.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[s] = x[s] @ m[e(s)] + scale2 * x2[s] @ m2[e(s)] + bias[e(s)]`` (no autograd; see module
    docstring)."""
    _check(x, m, offsets, x2, m2, bias)
    operands = [x, m] + ([x2, m2] if x2 is not None else [])
    if not triton_enabled(*operands):
        warn_fallback("grouped_mm")
        return grouped_mm_reference(x, m, offsets, x2, m2, scale2, bias)
    if _use_torch_grouped_mm(x, m):
        # the base product by torch's grouped GEMM; the LoRA term and the bias added to it in
        # place by the Triton kernel (one pass over y, no second (rows, N) product made)
        y = torch._grouped_mm(x, m, offs=offsets)
        if x2 is not None or bias is not None:
            _launch_grouped_mm(y, None, None, offsets, x2, m2, scale2, bias, accumulate=True)
        return y
    y = torch.empty(x.shape[0], m.shape[2], dtype=x.dtype, device=x.device)
    return _launch_grouped_mm(y, x, m, offsets, x2, m2, scale2, bias, accumulate=False)


def _launch_grouped_mm(y, x, m, offsets, x2, m2, scale2, bias, accumulate: bool) -> torch.Tensor:
    """``y (+)= x @ m + scale2 * x2 @ m2 + bias`` per expert group by the Triton kernel; either
    pair may be absent (None)."""
    rows, n = y.shape
    if rows == 0 or n == 0:
        return y
    absent = (y, y.unsqueeze(0))  # stands in for an absent pair (never read)
    first, second = (x, m) if x is not None else absent, (x2, m2) if x2 is not None else absent
    block_m, block_n, block_k, num_warps = _tiles(y.device)
    if x is None and x2 is not None:  # only the rank-r term: K is small
        block_k = max(16, min(block_k, triton.next_power_of_2(x2.shape[1])))
    n_experts = offsets.shape[0]
    n_tiles = triton.cdiv(rows, block_m) + n_experts  # at most: one partial tile per expert
    bias_or_y = bias if bias is not None else y
    precision, upcast = _dot_flags(*first)
    precision2, upcast2 = _dot_flags(*second)
    launch(
        _grouped_mm_kernel, (n_tiles, triton.cdiv(n, block_n)),
        first[0], first[1], y, second[0], second[1], bias_or_y, offsets, n_experts,
        first[0].stride(0), first[0].stride(1), first[1].stride(0), first[1].stride(1), first[1].stride(2),
        y.stride(0), y.stride(1),
        second[0].stride(0), second[0].stride(1), second[1].stride(0), second[1].stride(1), second[1].stride(2),
        bias_or_y.stride(0), bias_or_y.stride(1),
        n, first[0].shape[1], second[0].shape[1], float(scale2),
        HAS_FIRST=x is not None, HAS_SECOND=x2 is not None, HAS_BIAS=bias is not None, ACCUMULATE=accumulate,
        INPUT_PRECISION=precision, UPCAST=upcast, INPUT_PRECISION2=precision2, UPCAST2=upcast2,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_E=triton.next_power_of_2(n_experts),
        num_warps=num_warps,
    )  # fmt: skip
    return y


def grouped_mm_weight_grad(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``g[e] = dy[rows of e]^T @ x[rows of e]``, (experts, N, K); zeros for experts without rows."""
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(f"grouped_mm_weight_grad: dy and x must be (rows, N), (rows, K), got {tuple(dy.shape)}, {tuple(x.shape)}")
    if not triton_enabled(dy, x):
        warn_fallback("grouped_mm_weight_grad")
        return grouped_mm_weight_grad_reference(dy, x, offsets)
    n_experts, n, k = offsets.shape[0], dy.shape[1], x.shape[1]
    g = torch.empty(n_experts, n, k, dtype=x.dtype, device=x.device)
    if g.numel() == 0:
        return g
    block_m, block_n, block_k, num_warps = _tiles(x.device)
    block_n = block_k  # square (N, K) output tiles
    precision, upcast = _dot_flags(dy, x)
    launch(
        _grouped_weight_grad_kernel, (n_experts, triton.cdiv(n, block_n), triton.cdiv(k, block_k)),
        dy, x, g, offsets,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), g.stride(0), g.stride(1), g.stride(2),
        n, k,
        INPUT_PRECISION=precision, UPCAST=upcast, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps,
    )  # fmt: skip
    return g
