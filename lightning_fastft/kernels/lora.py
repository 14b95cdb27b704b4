"""Fused LoRA projections with hand-written backward: one linear, Q/K/V of one input, a GLU MLP.

A LoRA projection is ``y = x W^T + b + s (x A^T) B^T`` with a frozen base weight ``W`` (out, in)
(dense, or bitsandbytes 4-bit, dequantised right before each matmul and dropped right after),
a frozen bias ``b``, trainable ``A`` (r, in), ``B`` (out, r) and the scaling ``s = alpha / r``.
With ``xa = x A^T`` (kept from the forward: r values per token) and the upstream gradient
``dy``, over all tokens::

    dB  = s dy^T xa                  (out, r)
    dxa = s dy B                     (tokens, r)
    dA  = dxa^T x                    (r, in)
    dx  = dy W + dxa A               (tokens, in)

Only the LoRA weights and the input get gradients: base weight and bias are frozen. Matmuls run
in the compute dtype (the input's, or the autocast dtype when autocast is on), accumulating in
fp32 inside the matmul; LoRA weights are cast to it, their gradients back to their own dtype.
A projection whose ``lora_A`` is ``None`` is the plain frozen linear ``y = x W^T + b``.
Projections of one input (Q/K/V, gate/up) get their ``xa`` from one matmul over their ``A`` stacked,
their ``dA`` from one over their ``dxa`` side by side and their ``dxa A`` terms of ``dx`` from one
more: ``x`` is read once each way, not per projection.

The rank-r terms go first and the frozen GEMMs accumulate onto them (``beta = 1``): ``y = s xa B^T + b``,
then ``y += x W^T``; ``dx = dxa A``, then ``dx += dy W``. A full-width result is so written by the
small GEMM and read once in the large one's epilogue, rather than read and written again by a
rank-r update after it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .._runtime import triton_enabled
from .glu import _check_activation, glu, glu_backward, glu_forward
from .nf4 import dequantize_4bit


class LoRAWeights(NamedTuple):
    """One projection's weights. ``base``: dense (out, in) weight or bitsandbytes ``Params4bit``
    (then ``quant_state`` is its ``QuantState``); ``lora_A``/``lora_B`` ``None`` for no LoRA."""

    base: torch.Tensor
    quant_state: Any
    bias: torch.Tensor | None
    lora_A: torch.Tensor | None
    lora_B: torch.Tensor | None
    scaling: float


def lora_linear(x: torch.Tensor, w: LoRAWeights) -> torch.Tensor:
    """``x W^T + b + s (x A^T) B^T`` over the last dim of ``x`` (see :class:`_LoRALinearFunction`)."""
    return _LoRALinearFunction.apply(x, *w)


def lora_qkv(x: torch.Tensor, q: LoRAWeights, k: LoRAWeights, v: LoRAWeights):
    """``(q_out, k_out, v_out)``: three LoRA projections of one ``x`` in one autograd node."""
    outputs = _LoRAQKVFunction.apply(x, *q, *k, *v)
    return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outputs)


def lora_mlp(
    x: torch.Tensor,
    gate: LoRAWeights,
    up: LoRAWeights,
    down: LoRAWeights,
    activation: str,
    output_unused: bool = False,
) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` with LoRA projections and ``activation`` a GLU activation
    name (HF ``hidden_act``: "silu", "gelu_pytorch_tanh", "gelu"). One autograd node when the
    Triton GLU kernels can run; otherwise three :func:`lora_linear` around the reference GLU.

    ``output_unused=True``: the caller differentiates through the output but never reads its value
    (a checkpointed layer's recompute, :func:`~lightning_fastft.training.checkpointing.recomputing`):
    the down projection's base matmul is skipped (the backward needs only ``h A_down^T``) and the
    output is left uninitialised; the gradients are the same."""
    _check_activation(activation)
    if not triton_enabled(x):
        return lora_linear(glu(lora_linear(x, gate), lora_linear(x, up), activation), down)
    return _LoRAMLPFunction.apply(x, activation, output_unused, *gate, *up, *down)


_FIELDS = len(LoRAWeights._fields)


def _dense_weight(w: LoRAWeights, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) base weight in ``dtype``, dequantised when it is 4-bit."""
    if w.quant_state is not None:
        return dequantize_4bit(w.base, w.quant_state, dtype)
    return w.base.to(dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _project(
    x2: torch.Tensor, w: LoRAWeights, dtype: torch.dtype, xa: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y, xa)``: ``y = x W^T + b + s xa B^T`` and ``xa = x A^T`` (given, or computed here; ``None``
    without LoRA)."""
    weight = _dense_weight(w, dtype)
    bias = None if w.bias is None else w.bias.to(dtype)
    if w.lora_A is None:
        return F.linear(x2, weight, bias), None
    if xa is None:
        (xa,) = _lora_inputs(x2, [w], dtype)
    # without bias addmm's input is ignored (beta = 0: not even its NaNs), so an empty one (no fill kernel)
    start, beta = (x2.new_empty(()), 0) if bias is None else (bias, 1)
    y = torch.addmm(start, xa, w.lora_B.to(dtype).t(), beta=beta, alpha=w.scaling)
    y.addmm_(x2, weight.t())
    return y, xa


def _joined(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat(tensors, dim)``, without a copy for a single tensor."""
    return torch.cat(tensors, dim) if len(tensors) > 1 else tensors[0]


def _lora_inputs(x2: torch.Tensor, weights: list[LoRAWeights], dtype: torch.dtype) -> list[torch.Tensor | None]:
    """``xa = x A^T`` of each projection of one input (``None`` without LoRA), from one matmul over
    their ``A`` stacked: ``x`` is read once (column views of one (tokens, sum of ranks) result)."""
    adapters = [w.lora_A for w in weights if w.lora_A is not None]
    if not adapters:
        return [None] * len(weights)
    xa = x2 @ _joined([a.to(dtype) for a in adapters], 0).t()
    parts = iter(xa.split([a.shape[0] for a in adapters], dim=1))
    return [None if w.lora_A is None else next(parts) for w in weights]


def _grad_lora_B(dy: torch.Tensor, xa: torch.Tensor, w: LoRAWeights) -> torch.Tensor:
    """``dB = s dy^T xa``, in lora_B's dtype."""
    return (dy.t() @ xa).mul_(w.scaling).to(w.lora_B.dtype)


def _grad_lora_input(dy: torch.Tensor, w: LoRAWeights) -> torch.Tensor:
    """``dxa = s dy B``: the gradient of ``xa = x A^T``."""
    return (dy @ w.lora_B.to(dy.dtype)).mul_(w.scaling)


def _lora_grads(dy: torch.Tensor, xa: torch.Tensor | None, w: LoRAWeights, need_ab: bool):
    """``(dB, dxa)`` of one projection (both ``None`` without LoRA; dB ``None`` unless ``need_ab``),
    with ``dB = s dy^T xa``, ``dxa = s dy B``; ``dA`` comes from :func:`_grad_lora_A`."""
    if w.lora_A is None:
        return None, None
    return (_grad_lora_B(dy, xa, w) if need_ab else None), _grad_lora_input(dy, w)


def _input_grads(
    x2: torch.Tensor, dys: list, xas: list, weights: list[LoRAWeights], needs: list[bool], want_dx: bool
):
    """``(grads, dx)`` of projections of one input ``x``: their LoRA gradients in LoRAWeights field order,
    projection after projection, and ``dx = sum of (dy W + dxa A)`` (``None`` unless ``want_dx``).
    The ``dxa`` of all projections sit side by side in one (tokens, sum of ranks) matrix, so ``x`` is
    read once for every ``dA = dxa^T x`` and one matmul gives every ``dxa A`` (where ``dx`` starts)."""
    d_lora_B, dxas = [], []
    for dy, xa, w, need in zip(dys, xas, weights, needs):
        d_B, dxa = _lora_grads(dy, xa, w, need)
        d_lora_B.append(d_B)
        dxas.append(dxa)
    lora = [i for i, dxa in enumerate(dxas) if dxa is not None]
    stacked = _joined([dxas[i] for i in lora], 1) if lora else None
    dx = None
    if want_dx:
        dx = _lora_input_grad(stacked, [weights[i] for i in lora]) if lora else None
        for dy, w in zip(dys, weights):
            dx = _add_base_input_grad(dx, dy, w)
    d_lora_A = [None] * len(weights)
    if any(needs[i] for i in lora):  # a frozen adapter's rows of the one matmul are left unused
        for i, d_A in zip(lora, _grad_lora_A(x2, stacked, [weights[i] for i in lora])):
            d_lora_A[i] = d_A if needs[i] else None
    return [grad for d_A, d_B in zip(d_lora_A, d_lora_B) for grad in _weight_grads(d_A, d_B)], dx


def _grad_lora_A(x2: torch.Tensor, dxa: torch.Tensor, weights: list[LoRAWeights]) -> list[torch.Tensor]:
    """``dA = dxa^T x`` of projections of one input, in their lora_A's dtype, from one matmul over
    their ``dxa`` side by side (``dxa``: (tokens, sum of their ranks))."""
    parts = (dxa.t() @ x2).split([w.lora_A.shape[0] for w in weights])
    return [part.to(w.lora_A.dtype) for w, part in zip(weights, parts)]


def _lora_input_grad(dxa: torch.Tensor, weights: list[LoRAWeights]) -> torch.Tensor:
    """``sum of dxa A`` over projections of one input, as one matmul over their ``dxa`` side by side
    and their ``A`` stacked: the start of ``dx``, onto which the frozen GEMMs accumulate."""
    return dxa @ _joined([w.lora_A.to(dxa.dtype) for w in weights], 0)


def _add_base_input_grad(dx: torch.Tensor | None, dy: torch.Tensor, w: LoRAWeights) -> torch.Tensor:
    """``dx + dy W`` (``dx`` may be ``None``: then it starts at zero)."""
    weight = _dense_weight(w, dy.dtype)
    if dx is None:
        dx = dy @ weight
    else:
        dx.addmm_(dy, weight)
    return dx


def _unpack(args: tuple, count: int) -> list[LoRAWeights]:
    return [LoRAWeights(*args[i * _FIELDS:(i + 1) * _FIELDS]) for i in range(count)]


def _weight_grads(d_lora_A, d_lora_B) -> tuple:
    """Gradients in LoRAWeights field order: only lora_A and lora_B get one."""
    return (None, None, None, d_lora_A, d_lora_B, None)


def _needs_ab(ctx, index: int) -> bool:
    """Whether projection ``index``'s lora_A or lora_B needs a gradient (its LoRAWeights fields
    start after ``ctx.weights_offset`` leading arguments of ``apply``)."""
    first = ctx.weights_offset + index * _FIELDS
    return ctx.needs_input_grad[first + 3] or ctx.needs_input_grad[first + 4]


def _saved_weights(ctx, tensors: tuple, count: int) -> list[LoRAWeights]:
    """Rebuild the projections' LoRAWeights from saved (base, bias, A, B) and ctx constants."""
    weights = []
    for i in range(count):
        base, bias, lora_A, lora_B = tensors[4 * i:4 * i + 4]
        weights.append(LoRAWeights(base, ctx.quant_states[i], bias, lora_A, lora_B, ctx.scalings[i]))
    return weights


def _save_weights(ctx, weights: list[LoRAWeights]) -> list:
    ctx.quant_states = [w.quant_state for w in weights]
    ctx.scalings = [w.scaling for w in weights]
    return [t for w in weights for t in (w.base, w.bias, w.lora_A, w.lora_B)]


class _LoRALinearFunction(torch.autograd.Function):
    """``y = x W^T + b + s (x A^T) B^T``; backward ``dB = s dy^T xa``, ``dxa = s dy B``,
    ``dA = dxa^T x``, ``dx = dy W + dxa A`` with ``xa = x A^T`` saved (x, xa kept)."""

    @staticmethod
    def forward(ctx, x, *weight_args):
        (w,) = _unpack(weight_args, 1)
        dtype = _compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        y, xa = _project(x2, w, dtype)
        ctx.weights_offset = 1
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(x2, xa, *_save_weights(ctx, [w]))
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, *weight_tensors = ctx.saved_tensors
        (w,) = _saved_weights(ctx, weight_tensors, 1)
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)
        grads, dx = _input_grads(x2, [dy2], [xa], [w], [_needs_ab(ctx, 0)], ctx.needs_input_grad[0])
        if dx is not None:
            dx = dx.to(ctx.x_dtype).view(*dy.shape[:-1], x2.shape[-1])
        return (dx, *grads)


class _LoRAQKVFunction(torch.autograd.Function):
    """Q, K and V LoRA projections of one input ``x``; each output as in
    :class:`_LoRALinearFunction`, and ``dx = sum over q, k, v of (dy W + dxa A)``. Saves x once
    and the three ``xa = x A^T``."""

    @staticmethod
    def forward(ctx, x, *weight_args):
        weights = _unpack(weight_args, 3)
        dtype = _compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        outputs, xas = zip(*(_project(x2, w, dtype, xa) for w, xa in zip(weights, _lora_inputs(x2, weights, dtype))))
        ctx.weights_offset = 1
        ctx.x_dtype, ctx.x_shape = x.dtype, x.shape
        ctx.save_for_backward(x2, *xas, *_save_weights(ctx, weights))
        return outputs  # 2-D; lora_qkv reshapes outside the Function so RoPE may write in place

    @staticmethod
    def backward(ctx, *dys):
        x2, *rest = ctx.saved_tensors
        xas, weights = rest[:3], _saved_weights(ctx, rest[3:], 3)
        dys = [dy.reshape(-1, dy.shape[-1]).to(x2.dtype) for dy in dys]
        needs = [_needs_ab(ctx, i) for i in range(3)]
        grads, dx = _input_grads(x2, dys, xas, weights, needs, ctx.needs_input_grad[0])
        if dx is not None:
            dx = dx.to(ctx.x_dtype).view(ctx.x_shape)
        return (dx, *grads)


class _LoRAMLPFunction(torch.autograd.Function):
    """GLU MLP ``y = down(act(gate(x)) * up(x))`` with LoRA projections ``g = gate(x)``,
    ``u = up(x)``, ``h = act(g) * u``, ``y = down(h)``. Saves x, g, u and the small
    ``xa_gate``, ``xa_up``, ``ha_down = h A_down^T``; never h. Backward::

        down:  dB_d = s_d dy^T ha_down,  dha = s_d dy B_d,  dh = dy W_d + dha A_d,
               h recomputed from (g, u),  dA_d = dha^T h
        GLU:   dg = dh * u * act'(g),  du = dh * act(g)
        gate, up: as _LoRALinearFunction with dy = dg, du; dx = sum of both input grads.

    The GLU backward writes dg, du over the saved g, u (and h over dh), so the backward can
    run only once per forward (retain_graph is refused)."""

    @staticmethod
    def forward(ctx, x, activation, output_unused, *weight_args):
        gate, up, down = _unpack(weight_args, 3)
        dtype = _compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        xa_gate, xa_up = _lora_inputs(x2, [gate, up], dtype)
        g, xa_gate = _project(x2, gate, dtype, xa_gate)
        u, xa_up = _project(x2, up, dtype, xa_up)
        h = glu_forward(g, u, activation)
        if output_unused:  # the backward needs g, u and ha_down, not y (which has x's width)
            (ha_down,) = _lora_inputs(h, [down], dtype)
            y = x2.new_empty(x2.shape)
        else:
            y, ha_down = _project(h, down, dtype)
        del h
        ctx.weights_offset = 3
        ctx.x_dtype = x.dtype
        ctx.activation = activation
        ctx.consumed = False
        ctx.save_for_backward(x2, g, u, xa_gate, xa_up, ha_down, *_save_weights(ctx, [gate, up, down]))
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        if ctx.consumed:
            raise RuntimeError("lora_mlp's backward reuses its saved activations in place: it cannot run twice")
        ctx.consumed = True
        x2, g, u, xa_gate, xa_up, ha_down, *weight_tensors = ctx.saved_tensors
        gate, up, down = _saved_weights(ctx, weight_tensors, 3)
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)

        has_lora = down.lora_A is not None
        need_down_ab = has_lora and _needs_ab(ctx, 2)
        dha = _grad_lora_input(dy2, down) if has_lora else None
        d_down_A = d_down_B = None
        if need_down_ab:
            d_down_B = _grad_lora_B(dy2, ha_down, down)
        dh = _add_base_input_grad(_lora_input_grad(dha, [down]) if has_lora else None, dy2, down)
        del dy2
        if need_down_ab:
            h, dg, du = glu_backward(dh, g, u, ctx.activation, inplace=True, return_h=True)
            (d_down_A,) = _grad_lora_A(h, dha, [down])
            del h
        else:
            dg, du = glu_backward(dh, g, u, ctx.activation, inplace=True)
        del dh

        needs = [_needs_ab(ctx, 0), _needs_ab(ctx, 1)]
        grads, dx = _input_grads(x2, [dg, du], [xa_gate, xa_up], [gate, up], needs, ctx.needs_input_grad[0])
        if dx is not None:
            dx = dx.to(ctx.x_dtype).view(*dy.shape[:-1], x2.shape[-1])
        return (dx, None, None, *grads, *_weight_grads(d_down_A, d_down_B))
