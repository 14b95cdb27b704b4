"""Gated linear units: SwiGLU and GeGLU, ``h = act(gate) * up``, as Triton kernels.

Activations are named as Hugging Face's ``hidden_act``:

* ``"silu"``: ``silu(g) = g * s`` with ``s = sigmoid(g)``;
  ``silu'(g) = s * (1 + g * (1 - s))``.
* ``"gelu_pytorch_tanh"``: ``gelu(g) = g/2 * (1 + t)`` with ``t = tanh(y)``,
  ``y = k * (g + 0.044715 g^3)``, ``k = sqrt(2/pi)``;
  ``gelu'(g) = (1 + t)/2 + g/2 * (1 - t^2) * k * (1 + 3 * 0.044715 g^2)``.
  ``t`` itself is never formed: with ``e = exp(-2|y|)``, ``(1 + t)/2 = sigmoid(2y)`` is
  ``1 / (1 + e)`` for ``y >= 0`` and ``e / (1 + e)`` below, and ``(1 - t^2)/2 = 2e / (1 + e)^2``.
  Both are products and quotients of positive terms, accurate to a few ulp relative given
  ``y`` (whose own rounding, as in any fp32 evaluation, is amplified by ``|2y|``: 2.2e-6
  relative at worst for ``|g| <= 4.5``). Forming ``t`` first (``2 sigmoid(2y) - 1``, then
  ``1 + t``) cancelled catastrophically for ``g << 0``, where ``1 + t`` is tiny: ``gelu(-5)``
  was 30% off and ``gelu(-6)`` exactly 0.
* ``"gelu"`` (exact): ``gelu(g) = g/2 * (1 + erf(g/sqrt(2)))``;
  ``gelu'(g) = (1 + erf(g/sqrt(2)))/2 + g * exp(-g^2/2) / sqrt(2 pi)``.

For ``h = act(g) * u`` and an upstream gradient ``dh``: ``du = dh * act(g)`` and
``dg = dh * u * act'(g)``. The backward recomputes ``act(g)`` from ``g``: only ``gate`` and
``up`` are kept between forward and backward, never ``h`` or ``act(g)``.

All math runs in fp32 inside the kernels; results are rounded once to the input dtype.
Inputs may have any shape; the last dimension must be contiguous (rows may be strided, e.g.
the two halves of a fused ``gate_up`` projection).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._runtime import triton_enabled, warn_fallback
from ._launch import MAX_BLOCK, LaunchPolicy, launch

ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")
_ACTIVATION_IDS = {name: i for i, name in enumerate(ACTIVATIONS)}

_LAUNCH = LaunchPolicy(max_block=MAX_BLOCK)


def glu_reference(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``act(gate) * up`` in PyTorch: fp32 math, one rounding to the input dtype."""
    _check_activation(activation)
    g = gate.float()
    if activation == "silu":
        a = F.silu(g)
    elif activation == "gelu_pytorch_tanh":
        a = F.gelu(g, approximate="tanh")
    else:
        a = F.gelu(g)
    return (a * up.float()).to(gate.dtype)


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``act(gate) * up`` with autograd; Triton when possible, else :func:`glu_reference`."""
    _check_activation(activation)
    if not triton_enabled(gate, up):
        warn_fallback("glu")
        return glu_reference(gate, up, activation)
    return _GLUFunction.apply(gate, up, activation)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU ``silu(gate) * up``; ``silu'(g) = s (1 + g (1 - s))``, ``s = sigmoid(g)``."""
    return glu(gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GeGLU ``gelu(gate) * up``: ``approximate="tanh"`` (HF ``gelu_pytorch_tanh``) or ``"none"``
    (exact erf, HF ``gelu``). Derivatives are given in the module docstring."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    return glu(gate, up, "gelu_pytorch_tanh" if approximate == "tanh" else "gelu")


def _check_activation(activation: str) -> int:
    if activation not in _ACTIVATION_IDS:
        raise ValueError(f"unsupported GLU activation {activation!r}; expected one of {ACTIVATIONS}")
    return _ACTIVATION_IDS[activation]


@triton.jit
def _activation_and_derivative(g, ACTIVATION: tl.constexpr, NEED_DERIVATIVE: tl.constexpr):
    """act(g) and, when asked, act'(g) in fp32 (formulas in the module docstring)."""
    if ACTIVATION == 0:  # silu
        s = tl.sigmoid(g)
        a = g * s
        da = s * (1.0 + g * (1.0 - s)) if NEED_DERIVATIVE else a
    elif ACTIVATION == 1:  # gelu, tanh approximation, through e = exp(-2|y|) (module docstring)
        y = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        e = tl.exp(-2.0 * tl.abs(y))
        r = 1.0 / (1.0 + e)
        half_one_plus_t = tl.where(y >= 0.0, r, e * r)  # sigmoid(2y)
        a = g * half_one_plus_t
        if NEED_DERIVATIVE:
            half_one_minus_t2 = 2.0 * e * r * r
            da = half_one_plus_t + g * half_one_minus_t2 * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
        else:
            da = a
    else:  # gelu, exact erf
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        a = g * cdf
        da = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327 if NEED_DERIVATIVE else a
    return a, da


@triton.jit
def _glu_forward_kernel(
    gate_ptr, up_ptr, h_ptr,
    stride_gate, stride_up, stride_h,
    n_cols,
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """h = act(g) * u over a (rows, n_cols) view; one program per BLOCK columns of one row."""
    blocks_per_row = tl.cdiv(n_cols, BLOCK)
    pid = tl.program_id(0)
    row = (pid // blocks_per_row).to(tl.int64)
    cols = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    a, _ = _activation_and_derivative(g, ACTIVATION, False)
    tl.store(h_ptr + row * stride_h + cols, (a * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_backward_columns(
    row, cols, mask, dh_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, h_ptr,
    stride_dh, stride_gate, stride_up, stride_dgate, stride_dup, stride_h,
    weight,
    ACTIVATION: tl.constexpr,
    STORE_H: tl.constexpr,
    ROW_WEIGHTS: tl.constexpr,
):
    """The backward of the columns ``cols`` of one row (see :func:`_glu_backward_kernel`); returns
    ``dh * h`` (h rounded, dh unscaled) in fp32, the row's share of ``<dh, h>`` there."""
    dh = tl.load(dh_ptr + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    a, da = _activation_and_derivative(g, ACTIVATION, True)
    h = (a * u).to(h_ptr.dtype.element_ty)
    products = dh * h.to(tl.float32)
    if ROW_WEIGHTS:
        dh = (dh * weight).to(dh_ptr.dtype.element_ty).to(tl.float32)
    tl.store(dgate_ptr + row * stride_dgate + cols, (dh * u * da).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + row * stride_dup + cols, (dh * a).to(dup_ptr.dtype.element_ty), mask=mask)
    if STORE_H:
        tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
    return products


@triton.jit
def _glu_backward_kernel(
    dh_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, h_ptr, weights_ptr, dots_ptr,
    stride_dh, stride_gate, stride_up, stride_dgate, stride_dup, stride_h,
    n_cols,
    ACTIVATION: tl.constexpr,
    STORE_H: tl.constexpr,
    ROW_WEIGHTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """dg = dh * u * act'(g), du = dh * act(g), act(g) recomputed from g; optionally also
    h = act(g) * u. Every input element is loaded before any output is stored, so the outputs
    may alias the inputs (dgate onto gate, dup onto up, h onto dh); one program per BLOCK columns
    of one row. With ROW_WEIGHTS one program per row walks it BLOCK columns at a time: the
    incoming gradient is ``c * dh`` with ``c = weights[row]``, rounded to dh's dtype as a separate
    multiply would be, and ``dots[row] = <dh, h>`` (h rounded) is stored."""
    if ROW_WEIGHTS:
        row = tl.program_id(0).to(tl.int64)
        weight = tl.load(weights_ptr + row).to(dh_ptr.dtype.element_ty).to(tl.float32)
        dots = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            dots += _glu_backward_columns(
                row, cols, cols < n_cols, dh_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, h_ptr,
                stride_dh, stride_gate, stride_up, stride_dgate, stride_dup, stride_h,
                weight, ACTIVATION, STORE_H, ROW_WEIGHTS,
            )  # fmt: skip
        tl.store(dots_ptr + row, tl.sum(dots, axis=0))
    else:
        blocks_per_row = tl.cdiv(n_cols, BLOCK)
        pid = tl.program_id(0)
        row = (pid // blocks_per_row).to(tl.int64)
        cols = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
        _glu_backward_columns(
            row, cols, cols < n_cols, dh_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, h_ptr,
            stride_dh, stride_gate, stride_up, stride_dgate, stride_dup, stride_h,
            1.0, ACTIVATION, STORE_H, ROW_WEIGHTS,
        )  # fmt: skip


def _launch_shape(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], int, int, int, int]:
    """2-D (rows, cols) views of same-shaped, non-empty tensors with unit last stride, plus the
    column count, the launch grid size, block and num_warps. All contiguous (and int32-indexable):
    one flat row (long, fully vectorised blocks); otherwise one view per row with its own row stride."""
    shape = tensors[0].shape
    for t in tensors:
        if t.shape != shape:
            raise ValueError(f"GLU operands must share one shape, got {tuple(shape)} and {tuple(t.shape)}")
        if t.numel() and t.stride(-1) != 1:
            raise ValueError("GLU operands need a contiguous last dimension")
    if tensors[0].numel() < 2**31 and all(t.is_contiguous() for t in tensors):
        n_cols = tensors[0].numel()
        views = [t.view(1, n_cols) for t in tensors]
    else:
        n_cols = shape[-1]
        views = [t.view(-1, n_cols) for t in tensors]  # raises when rows are not one stride apart
    block, num_warps = _LAUNCH.settings(n_cols)
    grid = views[0].shape[0] * triton.cdiv(n_cols, block)
    return views, n_cols, grid, block, num_warps


def glu_forward(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """Triton launcher: ``h = act(gate) * up`` as a new contiguous tensor of gate's shape/dtype."""
    act_id = _check_activation(activation)
    h = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if h.numel() == 0:
        return h
    (gate2, up2, h2), n_cols, grid, block, num_warps = _launch_shape([gate, up, h])
    launch(
        _glu_forward_kernel, (grid,),
        gate2, up2, h2,
        gate2.stride(0), up2.stride(0), h2.stride(0),
        n_cols,
        ACTIVATION=act_id, BLOCK=block, num_warps=num_warps,
    )
    return h


def glu_backward(
    dh: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: str = "silu",
    *,
    inplace: bool = False,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    return_h: bool = False,
):
    """Triton launcher for the GLU backward, recomputing ``act(gate)`` from ``gate``.

    Returns ``(dgate, dup)``, or ``(h, dgate, dup)`` with ``return_h=True`` (``h = act(gate) *
    up`` recomputed in the same pass, e.g. for the down projection's weight gradient in a fused
    MLP backward). ``out=(dgate, dup)`` writes the gradients into those tensors, e.g. the two
    halves of one (rows, 2I) buffer that the fused ``gate_up`` projection's backward reads whole.

    ``inplace=True`` saves memory: ``dgate`` is written into ``gate``'s storage, ``dup`` into
    ``up``'s and ``h`` into ``dh``'s, and those same tensors are returned. The caller must not
    need ``gate``, ``up`` (nor ``dh`` when ``return_h``) afterwards, and they must be plain
    (rows x cols) strided views, not autograd-saved tensors something else still reads.
    """
    act_id = _check_activation(activation)
    if inplace and out is not None:
        raise ValueError("glu_backward: inplace=True writes into gate and up; it takes no out tensors")
    if inplace:
        dgate, dup = gate, up
        h = dh if return_h else None
    else:
        dgate, dup = out if out is not None else (torch.empty_like(gate), torch.empty_like(up))
        h = torch.empty_like(dh) if return_h else None
    if gate.numel():
        operands = [dh, gate, up, dgate, dup] + ([h] if return_h else [])
        views, n_cols, grid, block, num_warps = _launch_shape(operands)
        dh2, gate2, up2, dgate2, dup2 = views[:5]
        h2 = views[5] if return_h else dh2
        launch(
            _glu_backward_kernel, (grid,),
            dh2, gate2, up2, dgate2, dup2, h2, dh2, dh2,
            dh2.stride(0), gate2.stride(0), up2.stride(0), dgate2.stride(0), dup2.stride(0), h2.stride(0),
            n_cols,
            ACTIVATION=act_id, STORE_H=return_h, ROW_WEIGHTS=False, BLOCK=block, num_warps=num_warps,
        )
    return (h, dgate, dup) if return_h else (dgate, dup)


def glu_backward_weighted(
    dh: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    weights: torch.Tensor,
    activation: str = "silu",
    *,
    out: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The GLU backward of rows scaled after it: for ``y_s = c_s h_s`` (a mixture-of-experts row
    and its routing weight ``c_s``, ``weights`` (rows,)) from the unscaled upstream ``dh`` (rows,
    cols). Writes ``dgate``, ``dup`` for ``c_s dh_s`` (rounded to dh's dtype first, as a separate
    multiply would be) into ``out`` and returns ``(h, dc)``: ``h`` recomputed and ``dc_s = <dh_s,
    h_s>`` in fp32, the gradient of the weights. One pass, one program per row, which walks a row
    wider than the block (Mixtral's 14336) a block at a time."""
    act_id = _check_activation(activation)
    h = torch.empty(dh.shape, dtype=dh.dtype, device=dh.device)
    dots = torch.empty(dh.shape[0], dtype=torch.float32, device=dh.device)
    operands = (dh, gate, up, *out, h)
    if any(t.dim() != 2 or t.shape != dh.shape or t.stride(-1) != 1 for t in operands):
        raise ValueError(f"glu_backward_weighted: operands must be {tuple(dh.shape)} (rows, cols) with unit column stride")
    if dh.numel():
        block, num_warps = _LAUNCH.settings(dh.shape[1])
        launch(
            _glu_backward_kernel, (dh.shape[0],),
            *operands, weights, dots, *(t.stride(0) for t in operands), dh.shape[1],
            ACTIVATION=act_id, STORE_H=True, ROW_WEIGHTS=True, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
    return h, dots


class _GLUFunction(torch.autograd.Function):
    """``h = act(gate) * up``; backward ``dgate = dh * up * act'(gate)``, ``dup = dh * act(gate)``
    with ``act(gate)`` recomputed (only gate and up are saved)."""

    @staticmethod
    def forward(ctx, gate, up, activation):
        ctx.activation = activation
        ctx.save_for_backward(gate, up)
        return glu_forward(gate, up, activation)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        if dh.stride(-1) != 1:
            dh = dh.contiguous()
        dgate, dup = glu_backward(dh, gate, up, ctx.activation)
        return dgate, dup, None
