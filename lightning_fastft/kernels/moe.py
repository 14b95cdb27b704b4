"""Mixture-of-experts MLP: every routed expert's SwiGLU/GeGLU MLP as grouped GEMMs, one launch
per product for all experts, with optional LoRA on the stacked expert weights.

Shapes (transformers 5 layout): ``hidden`` (T, H); ``top_k_index``/``top_k_weights`` (T, k) as
the router returns them; ``gate_up`` (E, 2I, H) with the gate rows first; ``down`` (E, H, I).
A LoRA term on a weight ``W`` (E, out, in) is :class:`ExpertLora` ``(b, a, scale)`` with ``b``
(E, out, r) and ``a`` (E, r, in), adding ``scale * b_e @ a_e`` to ``W_e`` without forming it.

Forward, for the S = T * k (token, expert) pairs sorted by expert (a stable sort; ``tok[s]`` the
token of pair ``s``, ``e(s)`` its expert, ``w_s`` its routing weight):

* ``x_s = hidden[tok[s]]`` (a gather, never kept)
* ``u_s = x_s W_e^T + scale (x_s a_e^T) b_e^T`` (S, 2I), ``g_s, p_s`` its gate and up halves
* ``h_s = act(g_s) * p_s`` (the GLU kernel)
* ``d_s = h_s D_e^T + scale_d (h_s a_e^T) b_e^T`` (S, H)
* ``out[t] = sum over the k pairs s of token t of w_s d_s`` (``w_s d_s`` rounded once to the
  input dtype as Hugging Face does, un-permuted, the k terms summed in fp32)

Backward, from ``dout`` (T, H), with ``dy_s = dout[tok[s]]``:

* ``G_s = dy_s D_e + scale_d (dy_s b_e) a_e`` (the down projection transposed, unweighted)
* ``dw_s = <dy_s, d_s> = <G_s, h_s>`` (``d`` is linear in ``h``, so ``d`` is never kept)
* ``dh_s = w_s G_s``; ``dg, dp`` from the GLU backward (``act(g)`` and ``h`` recomputed from ``u``)
* ``dD_e = sum_s (w_s dy_s)^T h_s``; LoRA: ``db_e = scale sum (w_s dy_s)^T (h_s a_e^T)``,
  ``da_e = scale sum (w_s dy_s b_e)^T h_s`` (grouped weight-gradient GEMMs)
* ``dx_s = du_s W_e + scale (du_s b_e) a_e``; ``dW_e``, ``db_e``, ``da_e`` as for the down
  projection with ``du`` and ``x``
* ``dhidden[t] = sum over the k pairs of t of dx_s`` (un-permuted and summed: deterministic)

Kept for the backward: the sort order and group offsets, the up projection ``u`` (S, 2I) and
the two rank-r LoRA products; the layer input ``hidden`` is the caller's (never a per-expert
copy of the tokens). Expert weights are read, not copied.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .glu import glu_backward, glu_forward, glu_reference
from .grouped_gemm import grouped_mm, grouped_mm_weight_grad


class ExpertLora(NamedTuple):
    """``scale * b @ a`` added to a stacked expert weight: ``b`` (E, out, r), ``a`` (E, r, in)."""

    b: torch.Tensor
    a: torch.Tensor
    scale: float


def moe_experts_reference(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    activation: str = "silu",
    gate_up_lora: ExpertLora | None = None,
    down_lora: ExpertLora | None = None,
) -> torch.Tensor:
    """:func:`moe_experts` in PyTorch: a loop over experts as Hugging Face's eager experts run it."""
    n_experts, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for e in range(n_experts):
        token, slot = torch.where(top_k_index == e)
        if token.numel() == 0:
            continue
        x = hidden[token]
        w_gu = gate_up[e] if gate_up_lora is None else gate_up[e] + gate_up_lora.scale * gate_up_lora.b[e] @ gate_up_lora.a[e]
        w_d = down[e] if down_lora is None else down[e] + down_lora.scale * down_lora.b[e] @ down_lora.a[e]
        u = x @ w_gu.t()
        h = glu_reference(u[:, :inter], u[:, inter:], activation)
        d = h @ w_d.t()
        out = out.index_add(0, token, d.float() * top_k_weights[token, slot, None].float())
    return out.to(hidden.dtype)


def _sort_by_expert(top_k_index: torch.Tensor, n_experts: int):
    """(order, tok, offsets): pairs sorted by expert (stable), their tokens, int32 group ends."""
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    return order, order // top_k_index.shape[1], offsets


def _unsort_sum(sorted_rows: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    """Rows back in (token, slot) order, summed (in fp32) over the k slots of each token."""
    rows = torch.empty_like(sorted_rows)
    rows[order] = sorted_rows
    return rows.view(-1, k, *rows.shape[1:]).sum(1, dtype=torch.float32)


def _scale_rows(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weights[s] * rows[s]``, one rounding to the rows' dtype."""
    return rows * weights.to(rows.dtype)[:, None]


def _project(x, weight, offsets, lora: ExpertLora | None, lora_in: torch.Tensor | None) -> torch.Tensor:
    """``x W_e^T + scale (x a_e^T) b_e^T`` with ``lora_in = x a_e^T`` computed by the caller."""
    if lora is None:
        return grouped_mm(x, weight.transpose(1, 2), offsets)
    return grouped_mm(x, weight.transpose(1, 2), offsets, lora_in, lora.b.transpose(1, 2), lora.scale)


class _MoEExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, top_k_index, top_k_weights, gate_up, down, gu_b, gu_a, d_b, d_a, gu_scale, d_scale, activation):
        n_experts, inter = gate_up.shape[0], gate_up.shape[1] // 2
        k = top_k_index.shape[1]
        gu_lora = ExpertLora(gu_b, gu_a, gu_scale) if gu_b is not None else None
        d_lora = ExpertLora(d_b, d_a, d_scale) if d_b is not None else None
        order, tok, offsets = _sort_by_expert(top_k_index, n_experts)
        x = hidden[tok]
        xa = grouped_mm(x, gu_a.transpose(1, 2), offsets) if gu_lora else None
        u = _project(x, gate_up, offsets, gu_lora, xa)
        del x
        h = glu_forward(u[:, :inter], u[:, inter:], activation)
        ha = grouped_mm(h, d_a.transpose(1, 2), offsets) if d_lora else None
        d = _project(h, down, offsets, d_lora, ha)
        del h
        weights = top_k_weights.reshape(-1)[order]
        out = _unsort_sum(_scale_rows(d, weights), order, k)
        ctx.save_for_backward(hidden, top_k_weights, gate_up, down, gu_b, gu_a, d_b, d_a, order, offsets, u, xa, ha)
        ctx.scales, ctx.activation, ctx.k = (gu_scale, d_scale), activation, k
        return out.to(hidden.dtype)

    @staticmethod
    def backward(ctx, dout):
        hidden, top_k_weights, gate_up, down, gu_b, gu_a, d_b, d_a, order, offsets, u, xa, ha = ctx.saved_tensors
        gu_scale, d_scale = ctx.scales
        need = ctx.needs_input_grad
        inter, k = gate_up.shape[1] // 2, ctx.k
        tok = order // k
        dy = dout[tok].to(u.dtype)
        weights = top_k_weights.reshape(-1)[order]

        # down projection, transposed: G = dy D_e + scale (dy b_e) a_e
        dyb = grouped_mm(dy, d_b, offsets) if d_b is not None else None
        big_g = grouped_mm(dy, down, offsets, dyb, d_a, d_scale) if d_b is not None else grouped_mm(dy, down, offsets)
        dh = _scale_rows(big_g, weights)
        gate, up = u[:, :inter], u[:, inter:]
        h, dgate, dup = glu_backward(dh, gate, up, ctx.activation, return_h=True)
        d_weights = torch.empty(order.shape[0], dtype=top_k_weights.dtype, device=dout.device)
        d_weights[order] = torch.bmm(big_g.unsqueeze(1), h.unsqueeze(2)).view(-1).to(top_k_weights.dtype)
        del big_g

        dd = _scale_rows(dy, weights) if (need[4] or need[7]) else None
        grad_down = grouped_mm_weight_grad(dd, h, offsets) if need[4] else None
        grad_d_b = grouped_mm_weight_grad(dd, ha, offsets) * d_scale if need[7] else None
        grad_d_a = None
        if need[8]:
            grad_d_a = grouped_mm_weight_grad(_scale_rows(dyb, weights), h, offsets) * d_scale
        del dd, dy, dyb, h

        # gate/up projection, transposed: dx = du W_e + scale (du b_e) a_e, du = [dgate | dup]
        dub = None
        if gu_b is not None:
            dub = grouped_mm(dgate, gu_b[:, :inter], offsets, dup, gu_b[:, inter:], 1.0)
        grad_hidden = None
        if need[0]:
            dx = grouped_mm(dgate, gate_up[:, :inter], offsets, dup, gate_up[:, inter:], 1.0)
            if dub is not None:
                dx += grouped_mm(dub, gu_a, offsets) * gu_scale
            grad_hidden = _unsort_sum(dx, order, k).to(hidden.dtype)
            del dx
        x = hidden[tok] if (need[3] or need[6]) else None
        grad_gate_up = grad_gu_b = grad_gu_a = None
        if need[3]:
            grad_gate_up = torch.cat(
                [grouped_mm_weight_grad(dgate, x, offsets), grouped_mm_weight_grad(dup, x, offsets)], dim=1
            )
        if need[5]:
            grad_gu_b = (
                torch.cat([grouped_mm_weight_grad(dgate, xa, offsets), grouped_mm_weight_grad(dup, xa, offsets)], dim=1)
                * gu_scale
            )
        if need[6]:
            grad_gu_a = grouped_mm_weight_grad(dub, x, offsets) * gu_scale
        return (
            grad_hidden, None, d_weights.view(top_k_weights.shape), grad_gate_up, grad_down,
            grad_gu_b, grad_gu_a, grad_d_b, grad_d_a, None, None, None,
        )  # fmt: skip


def moe_experts(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    activation: str = "silu",
    gate_up_lora: ExpertLora | None = None,
    down_lora: ExpertLora | None = None,
) -> torch.Tensor:
    """The routed experts' output (T, H) with autograd (see the module docstring)."""
    n_experts = gate_up.shape[0]
    if gate_up.dim() != 3 or down.shape != (n_experts, hidden.shape[1], gate_up.shape[1] // 2):
        raise ValueError(
            f"moe_experts: gate_up must be (E, 2I, H) and down (E, H, I) for hidden {tuple(hidden.shape)}, "
            f"got {tuple(gate_up.shape)} and {tuple(down.shape)}"
        )
    if top_k_index.shape != top_k_weights.shape or top_k_index.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"moe_experts: top_k_index {tuple(top_k_index.shape)} and top_k_weights {tuple(top_k_weights.shape)} "
            f"must both be (tokens={hidden.shape[0]}, k)"
        )
    gu, dn = gate_up_lora, down_lora
    return _MoEExpertsFunction.apply(
        hidden, top_k_index, top_k_weights, gate_up, down,
        gu.b if gu else None, gu.a if gu else None, dn.b if dn else None, dn.a if dn else None,
        gu.scale if gu else 1.0, dn.scale if dn else 1.0, activation,
    )  # fmt: skip
