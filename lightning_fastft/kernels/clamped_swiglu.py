"""gpt-oss's clamped SwiGLU on interleaved gate/up columns, as Triton kernels.

gpt-oss's experts project to ``gate_up`` (..., 2I) whose even columns are the gate and odd ones
the up projection (``gate_up[..., ::2]``, ``gate_up[..., 1::2]``). With ``alpha`` (1.702) and
``limit`` (7.0), Hugging Face's ``GptOssExperts._apply_gate`` computes, per column pair:

* ``c = min(g, limit)``, ``v = clamp(p, -limit, limit)`` (``g``, ``p``: gate and up)
* ``s = sigmoid(alpha c)``, ``h = (v + 1) * c * s``

Backward, from ``dh`` (the clamps pass the gradient where their input lies inside the closed
range, as ``torch.clamp`` does, and block it outside):

* ``dg = dh * (v + 1) * s * (1 + alpha c (1 - s)) * [g <= limit]``
  (``d(c s)/dc = s + c * alpha s (1 - s)``)
* ``dp = dh * c * s * [-limit <= p <= limit]``

The kernels read the gate and up columns in place (a stride-2 walk of each row): no
de-interleaved copy of ``gate_up`` is made, and ``dgate_up`` comes back interleaved like it.
Only ``gate_up`` is kept for the backward, which recomputes ``c``, ``v`` and ``s``. All math
runs in fp32; results are rounded once to the input dtype. Rows may be strided; the last
dimension must be contiguous.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._runtime import triton_enabled, warn_fallback
from ._launch import MAX_BLOCK, WHOLE_ROW, LaunchPolicy, launch

_LAUNCH = LaunchPolicy(max_block=MAX_BLOCK)


class ClampedSwiGLU(NamedTuple):
    """The gate of gpt-oss's experts: ``alpha`` (sigmoid gain) and ``limit`` (clamp)."""

    alpha: float = 1.702
    limit: float = 7.0


def clamped_swiglu_reference(gate_up: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """:func:`clamped_swiglu` in PyTorch: Hugging Face's ``_apply_gate`` in fp32 (fp64 for fp64
    input), one rounding."""
    _check(gate_up)
    dtype = torch.promote_types(gate_up.dtype, torch.float32)
    gate = gate_up[..., ::2].to(dtype).clamp(max=limit)
    up = gate_up[..., 1::2].to(dtype).clamp(min=-limit, max=limit)
    return ((up + 1) * (gate * torch.sigmoid(alpha * gate))).to(gate_up.dtype)


def clamped_swiglu(gate_up: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """``(clamp(up) + 1) * c * sigmoid(alpha c)``, ``c = min(gate, limit)``, of interleaved
    ``gate_up`` (..., 2I) -> (..., I), with autograd; Triton when possible, else the reference."""
    _check(gate_up)
    if not triton_enabled(gate_up):
        warn_fallback("clamped_swiglu")
        return clamped_swiglu_reference(gate_up, alpha, limit)
    return _ClampedSwiGLUFunction.apply(gate_up, float(alpha), float(limit))


def _check(gate_up: torch.Tensor) -> None:
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"clamped_swiglu: gate_up must end in an even (gate, up) width, got {tuple(gate_up.shape)}")


@triton.jit
def _clamped_swiglu_forward_kernel(
    gate_up_ptr, h_ptr,
    stride_gate_up, stride_h,
    n_cols, alpha, limit,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """h = (clamp(p) + 1) * c * sigmoid(alpha c) over (rows, n_cols) outputs; one program per
    BLOCK columns of one row, reading gate column 2j and up column 2j + 1."""
    blocks_per_row = tl.cdiv(n_cols, BLOCK)
    pid = tl.program_id(0)
    row = (pid // blocks_per_row).to(tl.int64)
    cols = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    pair = gate_up_ptr + row * stride_gate_up + 2 * cols
    g = tl.load(pair, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(pair + 1, mask=mask, other=0.0).to(tl.float32)
    c = tl.minimum(g, limit)
    v = tl.minimum(tl.maximum(p, -limit), limit)
    h = (v + 1.0) * (c * tl.sigmoid(alpha * c))
    tl.store(h_ptr + row * stride_h + cols, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _clamped_swiglu_backward_kernel(
    dh_ptr, gate_up_ptr, dgate_up_ptr, h_ptr, weights_ptr, dots_ptr,
    stride_dh, stride_gate_up, stride_dgate_up, stride_h,
    n_cols, alpha, limit,
    STORE_H: tl.constexpr,
    ROW_WEIGHTS: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """dg, dp (module docstring) written interleaved into dgate_up; optionally also h. With
    ROW_WEIGHTS (one program per whole row) as the GLU backward's (:mod:`.glu`): the gradient
    ``c * dh`` of routing-weighted rows, ``dots[row] = <dh, h>``."""
    blocks_per_row = tl.cdiv(n_cols, BLOCK)
    pid = tl.program_id(0)
    row = (pid // blocks_per_row).to(tl.int64)
    cols = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dh = tl.load(dh_ptr + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
    pair = gate_up_ptr + row * stride_gate_up + 2 * cols
    g = tl.load(pair, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(pair + 1, mask=mask, other=0.0).to(tl.float32)
    c = tl.minimum(g, limit)
    v = tl.minimum(tl.maximum(p, -limit), limit)
    s = tl.sigmoid(alpha * c)
    glu = c * s
    h = ((v + 1.0) * glu).to(h_ptr.dtype.element_ty)
    if ROW_WEIGHTS:
        tl.store(dots_ptr + row, tl.sum(dh * h.to(tl.float32), axis=0))
        weight = tl.load(weights_ptr + row).to(dh_ptr.dtype.element_ty).to(tl.float32)
        dh = (dh * weight).to(dh_ptr.dtype.element_ty).to(tl.float32)
    dg = tl.where(g <= limit, dh * (v + 1.0) * s * (1.0 + alpha * c * (1.0 - s)), 0.0)
    dp = tl.where((p >= -limit) & (p <= limit), dh * glu, 0.0)
    out_pair = dgate_up_ptr + row * stride_dgate_up + 2 * cols
    tl.store(out_pair, dg.to(dgate_up_ptr.dtype.element_ty), mask=mask)
    tl.store(out_pair + 1, dp.to(dgate_up_ptr.dtype.element_ty), mask=mask)
    if STORE_H:
        tl.store(h_ptr + row * stride_h + cols, h, mask=mask)


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` as (rows, width) with a unit column stride (raises when rows are not one stride apart)."""
    if t.stride(-1) != 1:
        raise ValueError("clamped_swiglu: operands need a contiguous last dimension")
    return t.view(-1, width)


def clamped_swiglu_forward(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """Triton launcher: ``h`` (..., I) of interleaved ``gate_up`` (..., 2I), a new contiguous tensor."""
    n_cols = gate_up.shape[-1] // 2
    h = torch.empty(*gate_up.shape[:-1], n_cols, dtype=gate_up.dtype, device=gate_up.device)
    if h.numel() == 0:
        return h
    gate_up2, h2 = _rows(gate_up, 2 * n_cols), _rows(h, n_cols)
    block, num_warps = _LAUNCH.settings(n_cols)
    launch(
        _clamped_swiglu_forward_kernel, (h2.shape[0] * triton.cdiv(n_cols, block),),
        gate_up2, h2, gate_up2.stride(0), h2.stride(0), n_cols, float(alpha), float(limit),
        BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return h


def clamped_swiglu_backward(
    dh: torch.Tensor, gate_up: torch.Tensor, alpha: float, limit: float, *, return_h: bool = False
):
    """Triton launcher: ``dgate_up`` (interleaved like ``gate_up``), or ``(h, dgate_up)`` with
    ``return_h=True`` (``h`` recomputed in the same pass)."""
    n_cols = gate_up.shape[-1] // 2
    if dh.shape != (*gate_up.shape[:-1], n_cols):
        raise ValueError(f"clamped_swiglu: dh {tuple(dh.shape)} does not match gate_up {tuple(gate_up.shape)}")
    dgate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    h = torch.empty(dh.shape, dtype=gate_up.dtype, device=gate_up.device) if return_h else None
    if dh.numel():
        dh2, gate_up2, dgate_up2 = _rows(dh, n_cols), _rows(gate_up, 2 * n_cols), _rows(dgate_up, 2 * n_cols)
        h2 = _rows(h, n_cols) if return_h else dh2
        block, num_warps = _LAUNCH.settings(n_cols)
        launch(
            _clamped_swiglu_backward_kernel, (dh2.shape[0] * triton.cdiv(n_cols, block),),
            dh2, gate_up2, dgate_up2, h2, dh2, dh2,
            dh2.stride(0), gate_up2.stride(0), dgate_up2.stride(0), h2.stride(0),
            n_cols, float(alpha), float(limit),
            STORE_H=return_h, ROW_WEIGHTS=False, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
    return (h, dgate_up) if return_h else dgate_up


def clamped_swiglu_backward_weighted(
    dh: torch.Tensor, gate_up: torch.Tensor, weights: torch.Tensor, alpha: float, limit: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h, dgate_up, dc)`` for routing-weighted rows ``y_s = c_s h_s`` from the unscaled ``dh``
    (rows, I), as :func:`~.glu.glu_backward_weighted`: ``dgate_up`` for ``c_s dh_s``, ``h``
    recomputed, ``dc_s = <dh_s, h_s>`` in fp32; one program per row."""
    n_cols = gate_up.shape[-1] // 2
    if dh.dim() != 2 or dh.shape != (gate_up.shape[0], n_cols) or dh.stride(-1) != 1:
        raise ValueError(f"clamped_swiglu: dh {tuple(dh.shape)} does not match gate_up {tuple(gate_up.shape)}")
    dgate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    h = torch.empty(dh.shape, dtype=gate_up.dtype, device=gate_up.device)
    dots = torch.empty(dh.shape[0], dtype=torch.float32, device=dh.device)
    if dh.numel():
        gate_up2 = _rows(gate_up, 2 * n_cols)
        block, num_warps = WHOLE_ROW.settings(n_cols)
        launch(
            _clamped_swiglu_backward_kernel, (dh.shape[0],),
            dh, gate_up2, dgate_up, h, weights, dots,
            dh.stride(0), gate_up2.stride(0), dgate_up.stride(0), h.stride(0),
            n_cols, float(alpha), float(limit),
            STORE_H=True, ROW_WEIGHTS=True, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
    return h, dgate_up, dots


class _ClampedSwiGLUFunction(torch.autograd.Function):
    """Forward and backward by the kernels above; only ``gate_up`` is saved."""

    @staticmethod
    def forward(ctx, gate_up, alpha, limit):
        ctx.save_for_backward(gate_up)
        ctx.alpha, ctx.limit = alpha, limit
        return clamped_swiglu_forward(gate_up, alpha, limit)

    @staticmethod
    def backward(ctx, dh):
        (gate_up,) = ctx.saved_tensors
        if dh.stride(-1) != 1:
            dh = dh.contiguous()
        return clamped_swiglu_backward(dh, gate_up, ctx.alpha, ctx.limit), None, None
