"""Rotary position embedding applied in place to Q and K with one Triton launch.

Hugging Face ``rotate_half`` convention: for the first ``Dr`` dims of each head (``Dr <= D``;
the remaining dims pass through), with halves ``x1 = x[:Dr/2]`` and ``x2 = x[Dr/2:Dr]``::

    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin

``cos``/``sin`` hold duplicated halves (as HF builds them), so the kernel reads only the first
half. They come either per token, shaped ``(B or 1, S, Dr)`` exactly as HF's rotary embedding
module returns them, or as a table ``(P, Dr)`` indexed by integer ``position_ids`` ``(B, S)``.
A 2-D table without ``position_ids`` is read at positions ``0..S-1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime import triton_enabled, warn_fallback
from ._launch import MAX_BLOCK, LaunchPolicy, launch

_INT32_LIMIT = 2**31
_LAUNCH = LaunchPolicy(num_warps=4)  # 1, 2, 4 and 8 warps tie on an H100 (within 3%) at 2048 and 8192 tokens


def rope_qk_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-place PyTorch RoPE on q ``(B, S, Hq, D)`` and k ``(B, S, Hk, D)``."""
    _check_qk(q, k)
    cos_tokens = _per_token(cos, position_ids, q.shape[1]).unsqueeze(2)
    sin_tokens = _per_token(sin, position_ids, q.shape[1]).unsqueeze(2)
    return _rotate_reference(q, cos_tokens, sin_tokens), _rotate_reference(k, cos_tokens, sin_tokens)


def rope_qk_(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``(B, S, Hq, D)`` and k ``(B, S, Hk, D)`` in place and return them.

    q and k may have any strides whose last one is 1 (views of a ``(B, S, H*D)`` projection, or
    ``.transpose(1, 2)`` of ``(B, H, S, D)``). Differentiable in q and k (not in cos/sin); the
    backward rotates the incoming gradients in place when their layout allows it.

    When autograd records the op, use the returned tensors: they hold the same memory as q and k
    but are views with cheap backwards (``view``/``permute`` of the rotated root where the layout
    allows), whereas autograd would rebuild the passed-in views with ``as_strided``, whose backward
    zero-fills and scatters a buffer of the root's size.
    """
    _check_qk(q, k)
    _check_angles(cos, sin, position_ids, q)
    if position_ids is not None:
        position_ids = position_ids.to(q.device)
    if not triton_enabled(q, k, cos, sin):
        warn_fallback("rope_qk_")
        q_rotated, k_rotated = rope_qk_reference(q, k, cos, sin, position_ids)
        return q.copy_(q_rotated), k.copy_(k_rotated)
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rope_qk_: q and k must be contiguous in their last (head) dimension")
    if not (_no_internal_overlap(q) and _no_internal_overlap(k)) or _qk_overlap(q, k):
        raise ValueError("rope_qk_: q and k must not overlap themselves or each other to rotate in place")
    cos, sin = cos.contiguous(), sin.contiguous()
    q_root, k_root = _root(q), _root(k)
    shared_root = k_root is q_root
    rotated_roots = _RoPEQKFunction.apply(
        q_root, None if shared_root else k_root, _geometry(q, q_root), _geometry(k, k_root), cos, sin, position_ids
    )
    if not (q.requires_grad or k.requires_grad) or not torch.is_grad_enabled():
        return q, k
    q_root, k_root = (rotated_roots, rotated_roots) if shared_root else rotated_roots
    return _view_again(q, q_root), _view_again(k, k_root)


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rope_qk_: q and k must be (B, S, H, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"rope_qk_: q {tuple(q.shape)} and k {tuple(k.shape)} differ in B, S or D")


def _check_angles(cos, sin, position_ids, q) -> None:
    if cos.shape != sin.shape:
        raise ValueError(f"rope_qk_: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    batch, seq_len, _, head_dim = q.shape
    rotary_dim = cos.shape[-1]
    if rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rope_qk_: rotary dim {rotary_dim} must be even and <= head dim {head_dim}")
    if position_ids is not None:
        if cos.dim() != 2:
            raise ValueError("rope_qk_: with position_ids, cos/sin must be a (positions, Dr) table")
        if position_ids.dtype.is_floating_point or position_ids.shape[-1] != seq_len:
            raise ValueError(f"rope_qk_: position_ids must be integer (B, {seq_len}), got {position_ids.dtype}")
        if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch):
            raise ValueError(f"rope_qk_: position_ids must be (B or 1, S), got {tuple(position_ids.shape)}")
    elif cos.dim() == 2:
        if cos.shape[0] < seq_len:
            raise ValueError(f"rope_qk_: table of {cos.shape[0]} positions is shorter than seq len {seq_len}")
    elif cos.dim() != 3 or cos.shape[0] not in (1, batch) or cos.shape[1] != seq_len:
        raise ValueError(f"rope_qk_: per-token cos/sin must be (B or 1, {seq_len}, Dr), got {tuple(cos.shape)}")


def _per_token(angles: torch.Tensor, position_ids: torch.Tensor | None, seq_len: int) -> torch.Tensor:
    """cos/sin in any accepted form -> (B or 1, S, Dr)."""
    if position_ids is not None:
        return angles[position_ids]
    if angles.dim() == 2:
        return angles[:seq_len].unsqueeze(0)
    return angles


def _rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated.to(x.dtype), x_pass), dim=-1)


@triton.jit
def _rope_qk_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    position_ids_ptr,
    q_stride_b,
    q_stride_s,
    q_stride_h,
    k_stride_b,
    k_stride_s,
    k_stride_h,
    angle_stride_b,
    angle_stride_s,
    position_stride_b,
    position_stride_s,
    seq_len,
    n_q_heads,
    n_k_heads,
    HALF_ROTARY: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    USE_POSITION_IDS: tl.constexpr,
    INVERSE: tl.constexpr,
    LONG_INDEXING: tl.constexpr,
):
    """One program per token, all its Q and K heads, rotated in place.

    Forward:  (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
    INVERSE (the backward: the rotation is orthogonal, so the gradient is the transposed
    rotation, i.e. the same map with sin negated): (g1, g2) -> (g1 cos + g2 sin, g2 cos - g1 sin).
    """
    token = tl.program_id(0)
    if LONG_INDEXING:
        token = token.to(tl.int64)
    batch = token // seq_len
    pos = token % seq_len
    if USE_POSITION_IDS:
        angle_row = tl.load(position_ids_ptr + batch * position_stride_b + pos * position_stride_s)
        angle_offset = angle_row * angle_stride_s
    else:
        angle_offset = batch * angle_stride_b + pos * angle_stride_s
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HALF_ROTARY
    cos = tl.load(cos_ptr + angle_offset + dims, mask=dim_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + angle_offset + dims, mask=dim_mask, other=0.0).to(tl.float32)
    if INVERSE:
        sin = -sin
    q_token_ptr = q_ptr + batch * q_stride_b + pos * q_stride_s
    heads = tl.arange(0, BLOCK_HQ)
    for head_start in range(0, n_q_heads, BLOCK_HQ):
        offsets = (head_start + heads)[:, None] * q_stride_h + dims[None, :]
        mask = ((head_start + heads) < n_q_heads)[:, None] & dim_mask[None, :]
        x1 = tl.load(q_token_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(q_token_ptr + offsets + HALF_ROTARY, mask=mask, other=0.0).to(tl.float32)
        tl.store(q_token_ptr + offsets, (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(q_token_ptr + offsets + HALF_ROTARY, (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty), mask=mask)

    k_token_ptr = k_ptr + batch * k_stride_b + pos * k_stride_s
    heads = tl.arange(0, BLOCK_HK)
    for head_start in range(0, n_k_heads, BLOCK_HK):
        offsets = (head_start + heads)[:, None] * k_stride_h + dims[None, :]
        mask = ((head_start + heads) < n_k_heads)[:, None] & dim_mask[None, :]
        x1 = tl.load(k_token_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(k_token_ptr + offsets + HALF_ROTARY, mask=mask, other=0.0).to(tl.float32)
        tl.store(k_token_ptr + offsets, (x1 * cos - x2 * sin).to(k_ptr.dtype.element_ty), mask=mask)
        tl.store(k_token_ptr + offsets + HALF_ROTARY, (x2 * cos + x1 * sin).to(k_ptr.dtype.element_ty), mask=mask)


def _max_offset(t: torch.Tensor) -> int:
    """Largest element offset a kernel can address in ``t`` (its span minus one)."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size > 0)


def _no_internal_overlap(t: torch.Tensor) -> bool:
    """True when no two indices of ``t`` address the same element (so writing in place is safe)."""
    expected_min_stride = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s > 1):
        if stride < expected_min_stride:
            return False
        expected_min_stride = stride * size
    return True


def _ranges_intersect(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b live in one storage and their address ranges intersect."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a_start, b_start = a.data_ptr(), b.data_ptr()
    a_end = a_start + (_max_offset(a) + 1) * a.element_size()
    b_end = b_start + (_max_offset(b) + 1) * b.element_size()
    return a_start < b_end and b_start < a_end


def _qk_overlap(q: torch.Tensor, k: torch.Tensor) -> bool:
    """True when q and k may share elements.

    Interleaved address ranges are accepted in the common case of q and k being disjoint head
    ranges of one (B, S, H, D) tensor (a fused QKV projection, in any layout): same strides, k
    offset by whole heads past q's heads (or before them), and that combined tensor not
    overlapping itself.
    """
    if not _ranges_intersect(q, k):
        return False
    head_stride = q.stride(2)
    offset_delta = k.storage_offset() - q.storage_offset()
    if q.stride() != k.stride() or head_stride <= 0 or offset_delta % head_stride:
        return True
    head_delta = offset_delta // head_stride  # k's first head, in q's head numbering
    n_q_heads, n_k_heads = q.shape[2], k.shape[2]
    if -n_k_heads < head_delta < n_q_heads:
        return True
    first_head = min(0, head_delta)
    n_heads = max(n_q_heads, head_delta + n_k_heads) - first_head
    combined = q.as_strided(
        (q.shape[0], q.shape[1], n_heads, q.shape[3]), q.stride(), q.storage_offset() + first_head * head_stride
    )
    return not _no_internal_overlap(combined)


def rope_qk_forward(q, k, cos, sin, position_ids=None) -> None:
    """Triton launcher: rotate q ``(B, S, Hq, D)`` and k ``(B, S, Hk, D)`` in place (no autograd,
    no checks: :func:`rope_qk_` validates)."""
    _rotate(q, k, cos, sin, position_ids, inverse=False)


def rope_qk_backward(grad_q, grad_k, cos, sin, position_ids=None) -> None:
    """Triton launcher: apply the inverse (transposed) rotation to grad_q and grad_k in place."""
    _rotate(grad_q, grad_k, cos, sin, position_ids, inverse=True)


def _rotate(q, k, cos, sin, position_ids, inverse: bool) -> None:
    batch, seq_len, n_q_heads, head_dim = q.shape
    n_k_heads = k.shape[2]
    n_tokens = batch * seq_len
    if n_tokens == 0:
        return
    half_rotary = cos.shape[-1] // 2
    if position_ids is not None:
        angle_stride_b, angle_stride_s = 0, cos.stride(0)
        position_stride_b = position_ids.stride(0) if position_ids.shape[0] > 1 else 0
        position_stride_s = position_ids.stride(1)
    elif cos.dim() == 2:
        angle_stride_b, angle_stride_s = 0, cos.stride(0)
        position_stride_b = position_stride_s = 0
    else:
        angle_stride_b = cos.stride(0) if cos.shape[0] > 1 else 0
        angle_stride_s = cos.stride(1)
        position_stride_b = position_stride_s = 0
    tensors = [q, k, cos] + ([position_ids] if position_ids is not None else [])
    long_indexing = max(_max_offset(t) for t in tensors) >= _INT32_LIMIT or n_tokens >= _INT32_LIMIT
    block_d, num_warps = _LAUNCH.settings(half_rotary)
    max_heads_per_tile = max(1, MAX_BLOCK // block_d)
    block_hq = min(triton.next_power_of_2(n_q_heads), max_heads_per_tile)
    block_hk = min(triton.next_power_of_2(n_k_heads), max_heads_per_tile)
    launch(
        _rope_qk_kernel, (n_tokens,),
        q, k, cos, sin, position_ids if position_ids is not None else cos,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        angle_stride_b, angle_stride_s, position_stride_b, position_stride_s,
        seq_len, n_q_heads, n_k_heads,
        HALF_ROTARY=half_rotary, BLOCK_D=block_d, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
        USE_POSITION_IDS=position_ids is not None, INVERSE=inverse, LONG_INDEXING=long_indexing,
        num_warps=num_warps,
    )  # fmt: skip


def _view_again(view: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """``view``'s geometry rebuilt on ``root`` with the cheapest differentiable view op: ``view``
    when it covers the whole contiguous root in order, ``view`` + ``permute`` when it covers it in
    another dim order, else ``as_strided``."""
    if root is view:
        return root
    if view.storage_offset() == root.storage_offset() and view.numel() == root.numel() and root.is_contiguous():
        if view.is_contiguous():
            return root.view(view.shape)
        dims_by_stride = sorted(range(view.dim()), key=lambda d: -view.stride(d))
        in_order = view.permute(dims_by_stride)
        if in_order.is_contiguous():
            inverse = sorted(range(view.dim()), key=lambda d: dims_by_stride[d])
            return root.view(in_order.shape).permute(inverse)
    return root.as_strided(view.shape, view.stride(), view.storage_offset())


def _root(t: torch.Tensor) -> torch.Tensor:
    """The tensor ``t`` is a view of, or ``t`` itself."""
    return t._base if t._base is not None else t


def _geometry(view: torch.Tensor, root: torch.Tensor) -> tuple:
    """(shape, strides, element offset from ``root``): enough to rebuild ``view`` on any tensor
    laid out like ``root``."""
    return tuple(view.shape), view.stride(), view.storage_offset() - root.storage_offset()


def _rebuild(root: torch.Tensor, geometry: tuple) -> torch.Tensor:
    shape, strides, offset = geometry
    return root.as_strided(shape, strides, root.storage_offset() + offset)


def _copy_with_strides(t: torch.Tensor, strides: tuple) -> torch.Tensor:
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)


def _writable_like(grad: torch.Tensor, root_strides: tuple) -> torch.Tensor:
    """``grad`` itself when it has the root's strides, else a copy with them."""
    return grad if grad.stride() == root_strides else _copy_with_strides(grad, root_strides)


class _RoPEQKFunction(torch.autograd.Function):
    """In-place RoPE of q and k, applied through their root tensors.

    Autograd cannot let one Function dirty two views, so the Function takes the roots (the
    tensors q and k are views of, or themselves; one root when q and k share it, e.g. a fused
    QKV projection) and rebuilds q and k on them from their geometry. Autograd then replays the
    views of the modified roots. Backward: the rotation is orthogonal, so the gradient is its
    transpose, the same map with sin negated, ``(g1, g2) -> (g1 cos + g2 sin, g2 cos - g1 sin)``,
    applied in place to the q and k regions of the roots' gradients; everything else in them
    passes through.
    """

    @staticmethod
    def forward(ctx, q_root, k_root, q_geometry, k_geometry, cos, sin, position_ids):
        shared_root = k_root is None
        roots = (q_root,) if shared_root else (q_root, k_root)
        q = _rebuild(q_root, q_geometry)
        k = _rebuild(q_root if shared_root else k_root, k_geometry)
        rope_qk_forward(q, k, cos, sin, position_ids)
        ctx.mark_dirty(*roots)
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.geometries = (q_geometry, k_geometry)
        ctx.root_strides = tuple(root.stride() for root in roots)
        return roots if not shared_root else q_root

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_roots):
        cos, sin, position_ids = ctx.saved_tensors
        grads = [_writable_like(g, strides) for g, strides in zip(grad_roots, ctx.root_strides)]
        if len(grads) == 2 and _ranges_intersect(grads[0], grads[1]):  # e.g. (q + k).sum(): one tensor
            grads[1] = _copy_with_strides(grads[1], ctx.root_strides[1])
        grad_q = _rebuild(grads[0], ctx.geometries[0])
        grad_k = _rebuild(grads[-1], ctx.geometries[1])
        rope_qk_backward(grad_q, grad_k, cos, sin, position_ids)
        return grads[0], grads[1] if len(grads) == 2 else None, None, None, None, None, None
