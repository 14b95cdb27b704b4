"""Mixture-of-experts MLP: every routed expert's gated MLP as grouped GEMMs, one launch per
product for all experts, with optional LoRA on the stacked expert weights and per-expert biases.

Shapes: ``hidden`` (T, H); ``top_k_index``/``top_k_weights`` (T, k) as the router returns them.
The stacked weights come in either of Hugging Face's layouts: ``(E, out, in)`` (transformers 5's
default: ``gate_up`` (E, 2I, H), ``down`` (E, H, I)) or, with ``transposed=True``, ``(E, in, out)``
(gpt-oss: ``gate_up`` (E, H, 2I), ``down`` (E, I, H)). Below, ``W_e`` and ``D_e`` are expert
``e``'s gate/up and down matrices as ``(out, in)``; a transposed weight is read through its
``transpose(1, 2)`` view and its gradient written in its own layout: nothing is copied. Optional
biases ``c`` (E, 2I) and ``c_d`` (E, H). The gate, from ``u``'s 2I columns:

* a GLU activation name (:mod:`.glu`): gate columns first, then up: ``h = act(u[:I]) * u[I:]``;
* :class:`~.clamped_swiglu.ClampedSwiGLU` (gpt-oss): gate and up columns interleaved, gated by
  :func:`~.clamped_swiglu.clamped_swiglu`.

A LoRA term on a weight ``W`` is :class:`ExpertLora` ``(b, a, scale)`` with ``b`` (E, out, r) and
``a`` (E, r, in), adding ``scale * b_e @ a_e`` to ``W_e`` (as ``(out, in)``, whatever the storage)
without forming it.

Forward, for the S = T * k (token, expert) pairs sorted by expert (a stable sort; ``tok[s]`` the
token of pair ``s``, ``e(s)`` its expert, ``w_s`` its routing weight):

* ``x_s = hidden[tok[s]]`` (a gather, never kept)
* ``u_s = x_s W_e^T + scale (x_s a_e^T) b_e^T + c_e`` (S, 2I)
* ``h_s = gate(u_s)`` (S, I)
* ``d_s = h_s D_e^T + scale_d (h_s a_e^T) b_e^T + c_d,e`` (S, H)
* ``out[t] = sum over the k pairs s of token t of w_s d_s`` (``w_s d_s`` rounded once to the
  input dtype as Hugging Face does, un-permuted, the k terms summed in fp32)

Backward, from ``dout`` (T, H), with ``dy_s = dout[tok[s]]``:

* ``G_s = dy_s D_e + scale_d (dy_s b_e) a_e`` (the down projection transposed, unweighted)
* ``dw_s = <dy_s, d_s> = <G_s, h_s> + <dy_s, c_d,e>`` (``d`` is affine in ``h``, so ``d`` is
  never kept)
* ``dh_s = w_s G_s``; ``du_s`` (S, 2I, in ``u``'s column order) from the gate's backward, which
  recomputes ``h`` from ``u``
* ``dD_e = sum_s (w_s dy_s)^T h_s``, ``dc_d,e = sum_s w_s dy_s``; LoRA:
  ``db_e = scale sum (w_s dy_s)^T (h_s a_e^T)``, ``da_e = scale sum (w_s dy_s b_e)^T h_s``
  (grouped weight-gradient GEMMs; with the base frozen, ``w_s`` scales the rank-r factor
  ``h_s a_e^T`` rather than the wide ``dy_s``)
* ``dx_s = du_s W_e + scale (du_s b_e) a_e``; ``dW_e``, ``dc_e``, ``db_e``, ``da_e`` as for the
  down projection with ``du`` and ``x``
* ``dhidden[t] = sum over the k pairs of t of dx_s`` (un-permuted and summed: deterministic)

Per-expert sums over rows (the bias gradients) are grouped weight-gradient GEMMs against a column
of ones, deterministic like the rest (no atomics).

Kept for the backward: the sort order and group offsets, the up projection ``u`` (S, 2I) and
the two rank-r LoRA products; the layer input ``hidden`` is the caller's (never a per-expert
copy of the tokens). Expert weights are read, not copied.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._runtime import triton_enabled, warn_fallback
from .clamped_swiglu import (
    ClampedSwiGLU,
    clamped_swiglu_backward_weighted,
    clamped_swiglu_forward,
    clamped_swiglu_reference,
)
from .glu import glu_backward_weighted, glu_forward, glu_reference
from ._launch import LaunchPolicy, launch
from .grouped_gemm import grouped_mm, grouped_mm_weight_grad

ExpertActivation = str | ClampedSwiGLU
"""How the experts gate ``u`` (module docstring): a GLU activation name or :class:`ClampedSwiGLU`."""


class ExpertLora(NamedTuple):
    """``scale * b @ a`` added to a stacked expert weight: ``b`` (E, out, r), ``a`` (E, r, in)."""

    b: torch.Tensor
    a: torch.Tensor
    scale: float


def _as_in_out(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A stacked weight as (E, in, out), so that ``x @ m[e]`` projects: itself when stored
    transposed, else its ``transpose(1, 2)`` view."""
    return weight if transposed else weight.transpose(1, 2)


def _gate_reference(u: torch.Tensor, activation: ExpertActivation) -> torch.Tensor:
    if isinstance(activation, ClampedSwiGLU):
        return clamped_swiglu_reference(u, activation.alpha, activation.limit)
    inter = u.shape[1] // 2
    return glu_reference(u[:, :inter], u[:, inter:], activation)


def moe_experts_reference(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    activation: ExpertActivation = "silu",
    gate_up_lora: ExpertLora | None = None,
    down_lora: ExpertLora | None = None,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    transposed: bool = False,
) -> torch.Tensor:
    """:func:`moe_experts` in PyTorch: a loop over experts as Hugging Face's eager experts run it
    (summed in fp32, or fp64 for fp64 input)."""
    w_gu, w_d = _as_in_out(gate_up, transposed), _as_in_out(down, transposed)
    sum_dtype = _sum_dtype(hidden.dtype)
    out = torch.zeros(hidden.shape, dtype=sum_dtype, device=hidden.device)
    for e in range(gate_up.shape[0]):
        token, slot = torch.where(top_k_index == e)
        if token.numel() == 0:
            continue
        x = hidden[token]
        m_gu, m_d = w_gu[e], w_d[e]  # (in, out); a LoRA term scale * b a is (out, in)
        if gate_up_lora is not None:
            m_gu = m_gu + gate_up_lora.scale * (gate_up_lora.b[e] @ gate_up_lora.a[e]).t()
        if down_lora is not None:
            m_d = m_d + down_lora.scale * (down_lora.b[e] @ down_lora.a[e]).t()
        u = x @ m_gu + (gate_up_bias[e] if gate_up_bias is not None else 0)
        d = _gate_reference(u, activation) @ m_d + (down_bias[e] if down_bias is not None else 0)
        out = out.index_add(0, token, d.to(sum_dtype) * top_k_weights[token, slot, None].to(sum_dtype))
    return out.to(hidden.dtype)


def _sort_by_expert(top_k_index: torch.Tensor, n_experts: int):
    """(order, inverse, tok, offsets): (token, slot) pairs sorted by expert (stable), the inverse
    permutation (sorted position of each pair), their tokens, int32 group ends."""
    flat = top_k_index.reshape(-1)
    experts, order = torch.sort(flat, stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))
    ids = torch.arange(n_experts, device=flat.device)
    offsets = torch.searchsorted(experts, ids, right=True, out_int32=True)  # pairs with expert <= e
    return order, inverse, order // top_k_index.shape[1], offsets


def unsort_sum_reference(
    sorted_rows: torch.Tensor, inverse: torch.Tensor, k: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`unsort_sum` in PyTorch: the weighted rows gathered back to (token, slot) order, then
    summed over the slots."""
    rows = sorted_rows.index_select(0, inverse)
    if weights is not None:
        rows = _scale_rows(rows, weights.reshape(-1))
    return rows.view(-1, k, *rows.shape[1:]).sum(1, dtype=_sum_dtype(rows.dtype)).to(rows.dtype)


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@triton.jit
def _unsort_sum_kernel(
    ROWS, INVERSE, WEIGHTS, OUT, N, stride_rows, stride_out,
    K: tl.constexpr, HAS_WEIGHTS: tl.constexpr, SUM_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=SUM_DTYPE)
    for slot in tl.static_range(K):
        s = tl.load(INVERSE + token * K + slot).to(tl.int64)
        row = tl.load(ROWS + s * stride_rows + cols, mask=mask, other=0.0)
        if HAS_WEIGHTS:  # w * row rounded once to the rows' dtype (the product is exact in SUM_DTYPE)
            w = tl.load(WEIGHTS + token * K + slot)
            row = (row.to(SUM_DTYPE) * w.to(SUM_DTYPE)).to(ROWS.dtype.element_ty)
        acc += row.to(SUM_DTYPE)
    tl.store(OUT + token * stride_out + cols, acc.to(OUT.dtype.element_ty), mask=mask)


_UNSORT_LAUNCH = LaunchPolicy(max_block=1024)


def unsort_sum(
    sorted_rows: torch.Tensor, inverse: torch.Tensor, k: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``out[t] = sum over the k slots j of w[t, j] * sorted_rows[inverse[t k + j]]``: rows sorted by
    expert back in token order, each (optionally) scaled by its routing weight ``weights`` (T, k)
    in the rows' dtype with one rounding as Hugging Face does, the k terms summed in fp32 (fp64 for
    fp64 rows) and rounded once to the rows' dtype. One gather-and-sum pass: no permuted or scaled
    copy of the rows is made."""
    if weights is not None:
        weights = weights.to(sorted_rows.dtype).contiguous()
    if not triton_enabled(sorted_rows, inverse):
        warn_fallback("unsort_sum")
        return unsort_sum_reference(sorted_rows, inverse, k, weights)
    n_tokens, n = inverse.shape[0] // k, sorted_rows.shape[1]
    out = torch.empty(n_tokens, n, dtype=sorted_rows.dtype, device=sorted_rows.device)
    if out.numel() == 0:
        return out
    rows = sorted_rows if sorted_rows.stride(1) == 1 else sorted_rows.contiguous()
    block, num_warps = _UNSORT_LAUNCH.settings(n)
    sum_dtype = tl.float64 if rows.dtype == torch.float64 else tl.float32
    launch(
        _unsort_sum_kernel, (n_tokens, triton.cdiv(n, block)),
        rows, inverse, weights if weights is not None else rows, out, n, rows.stride(0), out.stride(0),
        K=k, HAS_WEIGHTS=weights is not None, SUM_DTYPE=sum_dtype, BLOCK_N=block, num_warps=num_warps,
    )  # fmt: skip
    return out


def _scale_rows(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weights[s] * rows[s]``, one rounding to the rows' dtype."""
    return rows * weights.to(rows.dtype)[:, None]


def _project(x, m, offsets, lora: ExpertLora | None, lora_in: torch.Tensor | None, bias) -> torch.Tensor:
    """``x m_e + scale (x a_e^T) b_e^T + bias_e`` (``m`` as (E, in, out)) with ``lora_in = x a_e^T``
    computed by the caller."""
    if lora is None:
        return grouped_mm(x, m, offsets, bias=bias)
    return grouped_mm(x, m, offsets, lora_in, lora.b.transpose(1, 2), lora.scale, bias=bias)


def _weight_grad(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``sum over the rows of e of dy^T x`` per expert, in the weight's layout: (E, out, in), or
    (E, in, out) for a transposed weight."""
    return grouped_mm_weight_grad(x, dy, offsets) if transposed else grouped_mm_weight_grad(dy, x, offsets)


def _segment_sum(rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``sum over the rows of e of rows[s]`` per expert, (E, N): a weight-gradient GEMM against ones."""
    ones = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
    return grouped_mm_weight_grad(rows, ones, offsets).squeeze(2)


def _gate_forward(u: torch.Tensor, activation: ExpertActivation) -> torch.Tensor:
    if isinstance(activation, ClampedSwiGLU):
        return clamped_swiglu_forward(u, activation.alpha, activation.limit)
    inter = u.shape[1] // 2
    return glu_forward(u[:, :inter], u[:, inter:], activation)


def _gate_backward(big_g: torch.Tensor, weights: torch.Tensor, u: torch.Tensor, activation: ExpertActivation):
    """``(h, du, dw)`` for rows scaled by their routing weights after the down projection: ``du``
    (laid out like ``u``, one buffer: the GLU writes its two halves) for ``dh_s = w_s G_s``, ``h``
    recomputed, ``dw_s = <G_s, h_s>`` in fp32. One pass (no scaled copy of G)."""
    if isinstance(activation, ClampedSwiGLU):
        return clamped_swiglu_backward_weighted(big_g, u, weights, activation.alpha, activation.limit)
    inter = u.shape[1] // 2
    du = torch.empty_like(u)
    halves = (du[:, :inter], du[:, inter:])
    h, d_weights = glu_backward_weighted(big_g, u[:, :inter], u[:, inter:], weights, activation, out=halves)
    return h, du, d_weights


class _MoEExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, top_k_index, top_k_weights, gate_up, down, gu_bias, d_bias, gu_b, gu_a, d_b, d_a,
        gu_scale, d_scale, activation, transposed, output_unused,
    ):  # fmt: skip
        k = top_k_index.shape[1]
        w_gu, w_d = _as_in_out(gate_up, transposed), _as_in_out(down, transposed)
        gu_lora = ExpertLora(gu_b, gu_a, gu_scale) if gu_b is not None else None
        d_lora = ExpertLora(d_b, d_a, d_scale) if d_b is not None else None
        order, inverse, tok, offsets = _sort_by_expert(top_k_index, gate_up.shape[0])
        x = hidden.index_select(0, tok)
        xa = grouped_mm(x, gu_a.transpose(1, 2), offsets) if gu_lora else None
        u = _project(x, w_gu, offsets, gu_lora, xa, gu_bias)
        del x
        h = _gate_forward(u, activation) if d_lora or not output_unused else None
        ha = grouped_mm(h, d_a.transpose(1, 2), offsets) if d_lora else None
        if output_unused:  # the backward needs u and the LoRA products, not d
            out = hidden.new_empty(hidden.shape)
        else:
            out = unsort_sum(_project(h, w_d, offsets, d_lora, ha, d_bias), inverse, k, top_k_weights)
        del h
        ctx.save_for_backward(
            hidden, top_k_weights, gate_up, down, d_bias, gu_b, gu_a, d_b, d_a, order, inverse, offsets, u, xa, ha
        )
        ctx.scales, ctx.activation, ctx.transposed, ctx.k = (gu_scale, d_scale), activation, transposed, k
        return out

    @staticmethod
    def backward(ctx, dout):
        hidden, top_k_weights, gate_up, down, d_bias, gu_b, gu_a, d_b, d_a, order, inverse, offsets, u, xa, ha = (
            ctx.saved_tensors
        )
        gu_scale, d_scale = ctx.scales
        transposed, k = ctx.transposed, ctx.k
        need_hidden, _, _, need_gu, need_d, need_gu_bias, need_d_bias, need_gu_b, need_gu_a, need_d_b, need_d_a = (
            ctx.needs_input_grad[:11]
        )
        w_gu, w_d = _as_in_out(gate_up, transposed), _as_in_out(down, transposed)
        tok = order // k
        dy = dout.index_select(0, tok).to(u.dtype)
        weights = top_k_weights.reshape(-1)[order]

        # down projection, transposed: G = dy D_e + scale (dy b_e) a_e
        dyb = grouped_mm(dy, d_b, offsets) if d_b is not None else None
        d_lora_term = (dyb, d_a, d_scale) if d_b is not None else ()
        big_g = grouped_mm(dy, w_d.transpose(1, 2), offsets, *d_lora_term)
        h, du, d_weights = _gate_backward(big_g, weights, u, ctx.activation)
        if d_bias is not None:  # <dy_s, c_d,e>: a grouped product with the bias as an (H, 1) matrix
            d_weights += grouped_mm(dy, d_bias.unsqueeze(2), offsets).view(-1)
        grad_weights = d_weights.index_select(0, inverse).to(top_k_weights.dtype)
        del big_g, d_weights

        dd = _scale_rows(dy, weights) if (need_d or need_d_bias) else None
        grad_down = _weight_grad(dd, h, offsets, transposed) if need_d else None
        grad_d_bias = _segment_sum(dd, offsets) if need_d_bias else None
        grad_d_b = None
        if need_d_b:  # the routing weight goes on the rank-r side when dd is not needed otherwise
            dd_ha = (dd, ha) if dd is not None else (dy, _scale_rows(ha, weights))
            grad_d_b = grouped_mm_weight_grad(*dd_ha, offsets) * d_scale
        grad_d_a = None
        if need_d_a:
            grad_d_a = grouped_mm_weight_grad(_scale_rows(dyb, weights), h, offsets) * d_scale
        del dd, dy, dyb, h

        # gate/up projection, transposed: dx = du W_e + scale (du b_e) a_e
        dub = grouped_mm(du, gu_b, offsets) if gu_b is not None else None
        grad_hidden = None
        if need_hidden:
            gu_lora_term = (dub, gu_a, gu_scale) if gu_b is not None else ()
            dx = grouped_mm(du, w_gu.transpose(1, 2), offsets, *gu_lora_term)
            grad_hidden = unsort_sum(dx, inverse, k)
            del dx
        x = hidden.index_select(0, tok) if (need_gu or need_gu_a) else None
        grad_gate_up = _weight_grad(du, x, offsets, transposed) if need_gu else None
        grad_gu_bias = _segment_sum(du, offsets) if need_gu_bias else None
        grad_gu_b = grouped_mm_weight_grad(du, xa, offsets) * gu_scale if need_gu_b else None
        grad_gu_a = grouped_mm_weight_grad(dub, x, offsets) * gu_scale if need_gu_a else None
        return (
            grad_hidden, None, grad_weights.view(top_k_weights.shape), grad_gate_up, grad_down, grad_gu_bias,
            grad_d_bias, grad_gu_b, grad_gu_a, grad_d_b, grad_d_a, None, None, None, None, None,
        )  # fmt: skip


def moe_experts(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    activation: ExpertActivation = "silu",
    gate_up_lora: ExpertLora | None = None,
    down_lora: ExpertLora | None = None,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    transposed: bool = False,
    output_unused: bool = False,
) -> torch.Tensor:
    """The routed experts' output (T, H) with autograd (see the module docstring); where Triton
    cannot run (no CUDA device, TRITON_INTERPRET unset) :func:`moe_experts_reference`.

    ``output_unused=True``: the caller differentiates through the output but never reads its value
    (a checkpointed layer's recompute, :func:`~lightning_fastft.training.checkpointing.recomputing`):
    the down projection and the un-permutation are skipped (the backward does not need ``d``) and
    the output is left uninitialised; the gradients are the same."""
    n_experts, hidden_size = gate_up.shape[0], hidden.shape[1]
    w_gu, w_d = _as_in_out(gate_up, transposed), _as_in_out(down, transposed)
    if gate_up.dim() != 3 or w_gu.shape[1] != hidden_size or w_d.shape != (n_experts, w_gu.shape[2] // 2, hidden_size):
        layout = "(E, H, 2I) and down (E, I, H)" if transposed else "(E, 2I, H) and down (E, H, I)"
        raise ValueError(
            f"moe_experts: gate_up must be {layout} for hidden {tuple(hidden.shape)}, "
            f"got {tuple(gate_up.shape)} and {tuple(down.shape)}"
        )
    for name, bias, width in (("gate_up_bias", gate_up_bias, w_gu.shape[2]), ("down_bias", down_bias, hidden_size)):
        if bias is not None and bias.shape != (n_experts, width):
            raise ValueError(
                f"moe_experts: {name} must be (E, {width}) = {(n_experts, width)}, got {tuple(bias.shape)}"
            )
    if top_k_index.shape != top_k_weights.shape or top_k_index.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"moe_experts: top_k_index {tuple(top_k_index.shape)} and top_k_weights {tuple(top_k_weights.shape)} "
            f"must both be (tokens={hidden.shape[0]}, k)"
        )
    gu, dn = gate_up_lora, down_lora
    if not triton_enabled(hidden, gate_up, down):
        warn_fallback("moe_experts")
        return moe_experts_reference(
            hidden, top_k_index, top_k_weights, gate_up, down, activation, gu, dn, gate_up_bias, down_bias, transposed
        )
    return _MoEExpertsFunction.apply(
        hidden, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias,
        gu.b if gu else None, gu.a if gu else None, dn.b if dn else None, dn.a if dn else None,
        gu.scale if gu else 1.0, dn.scale if dn else 1.0, activation, transposed, output_unused,
    )  # fmt: skip
