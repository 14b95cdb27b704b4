"""Chunked log-probabilities of target tokens (and the policy entropy) without (tokens x vocab) logits.

Rows (tokens) are processed in chunks, as :mod:`lightning_fastft.kernels.cross_entropy` does: for
each chunk the logits ``z = h W^T`` are computed in the input dtype (fp32 accumulation) into one
reused buffer, and a Triton kernel reduces every row, in fp32, to the target's log-probability, the
row's logsumexp and, when asked, its entropy (online max / sum over vocab blocks, one pass). Only
the per-row results are kept; the backward recomputes each chunk's logits and overwrites them, in
place, with ``d / dz``, then ``grad_h = dz W`` and ``grad_W += dz^T h``.

Per row with target ``y``, soft cap ``c`` (optional) and temperature ``T``; the soft cap is applied
to the raw logits *before* the temperature (Gemma's model-side cap, then the sampler's
temperature)::

    s = c tanh(z / c)                 (s = z without a cap)
    u = s / T
    lse = logsumexp(u),  p = softmax(u) = exp(u - lse)
    logp = u_y - lse
    H = -sum_j p_j log p_j = lse - sum_j p_j u_j

Backward, for upstream gradients ``g`` (of ``logp``) and ``g_H`` (of ``H``), per input:

    d lse / d u_j  = p_j,   d p_k / d u_j = p_k (delta_kj - p_j)
    d logp / d u_j = onehot(y)_j - p_j
    d H / d u_j    = p_j - [p_j + sum_k u_k p_k (delta_kj - p_j)]        (H = lse - sum_k p_k u_k)
                   = -p_j (u_j - sum_k p_k u_k) = -p_j (log p_j + H)   (u_j = log p_j + lse, sum p u = lse - H)
    d u_j / d s_j  = 1 / T
    d s_j / d z_j  = 1 - tanh(z_j / c)^2          (1 without a cap)
    dz_j           = [g (onehot(y)_j - p_j) - g_H p_j (log p_j + H)] / T * (1 - tanh(z_j / c)^2)
    grad_hidden    = dz W            (each chunk's rows)
    grad_weight    = sum_chunks dz^T h   (only when ``weight.requires_grad``)

``log p_j = u_j - lse`` is recomputed from the saved ``lse``; ``H`` is the saved entropy output.
The forward accumulates the entropy as ``H = log S - W / S`` with ``S = sum exp(u - m)`` and
``W = sum exp(u - m) (u - m)`` (``m`` the running max; a new max ``m'`` rescales
``W <- e^(m - m') (W - (m' - m) S)``), so no term cancels against ``lse``.

Saved for backward: hidden, weight, targets, the per-row logsumexp (fp32) and, only when the
entropy is returned, the per-row entropy (fp32). Never more than one chunk of logits exists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .._runtime import triton_enabled, warn_fallback
from ..kernels import cross_entropy as _ce
from ..kernels._launch import MAX_BLOCK, LaunchPolicy, launch
from ..kernels.cross_entropy import _softcapped

_LAUNCH = LaunchPolicy(max_block=MAX_BLOCK)


def chunk_rows(n_rows: int, n_vocab: int, itemsize: int, chunk_size: int | None = None) -> int:
    """Rows per chunk: ``chunk_size``, or as many as keep one chunk's logits (rows x vocab x
    itemsize bytes) under :data:`lightning_fastft.kernels.cross_entropy.LOGITS_CHUNK_BYTES`;
    balanced so the chunks are equal-sized (the cross-entropy's own rule, shared)."""
    return _ce._chunk_rows(n_rows, n_vocab, itemsize, chunk_size)


def chunked_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
    return_entropy: bool = False,
):
    """PyTorch reference: materialises the fp32 logits (all of them), then ``log_softmax``."""
    logits = hidden.float() @ weight.float().t()
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    logp = logprobs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    return logp, -(logprobs.exp() * logprobs).sum(-1)


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
    chunk_size: int | None = None,
    return_entropy: bool = False,
):
    """fp32 ``log_softmax(softcap(hidden @ weight.T) / temperature)[targets]``, chunk by chunk.

    hidden (..., H), weight (V, H), targets (...) int with ``targets.shape == hidden.shape[:-1]``.
    Returns the log-probabilities, shape ``targets.shape``, fp32; with ``return_entropy`` also the
    entropy ``-sum p log p`` of each row's distribution (same shape, fp32), computed in the same
    pass. ``logit_softcap`` ``c`` caps the logits ``c tanh(z / c)`` *before* dividing by the
    temperature. ``chunk_size`` overrides the rows per chunk (default: what keeps one chunk's
    logits under ``LOGITS_CHUNK_BYTES``). Differentiable wrt hidden and, when
    ``weight.requires_grad``, wrt weight (formulas in the module docstring); a single backward per
    forward's graph (no double backward). Under autocast the matmuls run in the autocast dtype;
    otherwise hidden is cast to weight's dtype; the logits of one chunk are held in that dtype
    (as a model's ``lm_head`` output is) and reduced in fp32. A target outside ``[0, V)`` raises
    ``ValueError`` naming it (one host read per call).
    """
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden (..., H) and weight (V, H), got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logit_softcap is not None and not float(logit_softcap) > 0:
        raise ValueError(f"logit_softcap must be > 0 or None, got {logit_softcap}")
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
    check_token_ids(targets, weight.shape[0], "targets")

    out_shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    else:
        hidden = hidden.to(weight.dtype)
    targets = targets.reshape(-1).to(device=hidden.device, dtype=torch.long).contiguous()
    temperature = float(temperature)
    softcap = None if logit_softcap is None else float(logit_softcap)
    use_triton = triton_enabled(hidden, weight, targets)
    if not use_triton:
        warn_fallback("chunked_logprobs")
    grad_wanted = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if grad_wanted:
        out = _ChunkedLogprobsFunction.apply(
            hidden, weight, targets, temperature, softcap, chunk_size, return_entropy, use_triton
        )
        logp, entropy = (out if return_entropy else (out, None))
    else:
        logp, _, entropy = chunked_logprobs_forward(
            hidden, weight, targets, temperature, softcap, chunk_size, return_entropy, use_triton
        )
    logp = logp.reshape(out_shape)
    return (logp, entropy.reshape(out_shape)) if return_entropy else logp


def check_token_ids(ids: torch.Tensor, n_vocab: int, name: str) -> None:
    """Raise ``ValueError`` naming the first entry of ``ids`` outside ``[0, n_vocab)`` (the kernel
    would otherwise read outside the row). One vectorised pass and one host read, as
    :func:`lightning_fastft.kernels.cross_entropy._check_targets` (which also admits an
    ``ignore_index``; here every entry must be a token)."""
    if ids.numel() == 0:
        return
    bad = ((ids < 0) | (ids >= n_vocab)).reshape(-1)
    first = bad.to(torch.uint8).argmax()
    found, value, *position = torch.stack(
        (bad[first].long(), ids.reshape(-1)[first].long(), *torch.unravel_index(first, ids.shape))
    ).tolist()
    if found:
        raise ValueError(
            f"{name}[{', '.join(map(str, position))}] = {value} is not a token id: expected "
            f"0 <= {name} < {n_vocab} (the vocab size)"
        )


@triton.jit
def _logprobs_rows_kernel(
    logits_ptr, stride_row,
    target_ptr, logp_ptr, lse_ptr, entropy_ptr,
    n_vocab, temperature, softcap,
    HAS_SOFTCAP: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Per row, one pass over vocab blocks: u = softcap(z) / T; running max m, S = sum e^(u-m),
    and (entropy) W = sum e^(u-m) (u-m); then lse = m + log S, logp = u_y - lse, H = log S - W/S."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    running_max = -float("inf")
    running_sum = 0.0
    running_w = 0.0
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_vocab
        z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        s, _ = _softcapped(z, softcap, HAS_SOFTCAP)
        u = tl.where(mask, s / temperature, -float("inf"))
        new_max = tl.maximum(running_max, tl.max(u, axis=0))
        alpha = tl.exp(running_max - new_max)
        shifted = u - new_max
        e = tl.exp(shifted)
        if WITH_ENTROPY:
            # W is relative to the old max: re-centre it on the new one (nothing to move while S = 0).
            old_max = tl.where(running_sum > 0.0, running_max, new_max)
            running_w = alpha * (running_w - (new_max - old_max) * running_sum)
            running_w += tl.sum(e * tl.where(mask, shifted, 0.0), axis=0)
        running_sum = running_sum * alpha + tl.sum(e, axis=0)
        running_max = new_max
    log_sum = tl.log(running_sum)
    lse = running_max + log_sum
    target = tl.load(target_ptr + row)
    in_vocab = (target >= 0) & (target < n_vocab)
    z_target = tl.load(row_ptr + target, mask=in_vocab, other=float("nan")).to(tl.float32)
    s_target, _ = _softcapped(z_target, softcap, HAS_SOFTCAP)
    tl.store(logp_ptr + row, s_target / temperature - lse)
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.maximum(log_sum - running_w / running_sum, 0.0))


@triton.jit
def _logprobs_rows_backward_kernel(
    logits_ptr, stride_row,
    target_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
    n_vocab, temperature, softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Per row, the logits overwritten with dz = [g (onehot(y) - p) - g_H p (log p + H)] / T * softcap'."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(target_ptr + row)
    lse = tl.load(lse_ptr + row)
    if HAS_GRAD_LOGP:
        g = tl.load(grad_logp_ptr + row).to(tl.float32)
    else:
        g = 0.0
    if HAS_GRAD_ENTROPY:
        g_entropy = tl.load(grad_entropy_ptr + row).to(tl.float32)
        entropy = tl.load(entropy_ptr + row)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_vocab
        z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        s, ds = _softcapped(z, softcap, HAS_SOFTCAP)
        log_p = s / temperature - lse
        p = tl.exp(log_p)
        grad = tl.where(cols == target, g, 0.0) - g * p
        if HAS_GRAD_ENTROPY:
            grad -= g_entropy * p * (log_p + entropy)
        grad = grad / temperature * ds
        tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def _rows_forward_triton(logits, targets, logp, lse, entropy, temperature, softcap):
    n_rows, n_vocab = logits.shape
    block_v, num_warps = _LAUNCH.settings(n_vocab)
    launch(
        _logprobs_rows_kernel, (n_rows,),
        logits, logits.stride(0),
        targets, logp, lse, entropy if entropy is not None else lse,
        n_vocab, temperature, 1.0 if softcap is None else softcap,
        HAS_SOFTCAP=softcap is not None,
        WITH_ENTROPY=entropy is not None,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )


def _softcap_torch(z, softcap):
    """(softcap(z), d softcap / dz) in fp32."""
    if softcap is None:
        return z, None
    tanh = torch.tanh(z / softcap)
    return softcap * tanh, 1.0 - tanh * tanh


def _rows_forward_torch(logits, targets, logp, lse, entropy, temperature, softcap):
    """PyTorch twin of :func:`_rows_forward_triton` (fp32 math on one chunk)."""
    s, _ = _softcap_torch(logits.float(), softcap)
    u = s / temperature
    row_lse = torch.logsumexp(u, dim=1)
    lse.copy_(row_lse)
    logp.copy_(u.gather(1, targets.unsqueeze(1)).squeeze(1) - row_lse)
    if entropy is not None:
        log_p = u - row_lse.unsqueeze(1)
        entropy.copy_((-(log_p.exp() * log_p).sum(1)).clamp_min(0.0))


def _rows_backward_triton(logits, targets, lse, entropy, grad_logp, grad_entropy, temperature, softcap):
    n_rows, n_vocab = logits.shape
    block_v, num_warps = _LAUNCH.settings(n_vocab)
    launch(
        _logprobs_rows_backward_kernel, (n_rows,),
        logits, logits.stride(0),
        targets, lse,
        entropy if grad_entropy is not None else lse,
        grad_logp if grad_logp is not None else lse,
        grad_entropy if grad_entropy is not None else lse,
        n_vocab, temperature, 1.0 if softcap is None else softcap,
        HAS_SOFTCAP=softcap is not None,
        HAS_GRAD_LOGP=grad_logp is not None,
        HAS_GRAD_ENTROPY=grad_entropy is not None,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )


def _rows_backward_torch(logits, targets, lse, entropy, grad_logp, grad_entropy, temperature, softcap):
    """PyTorch twin of :func:`_rows_backward_triton`."""
    s, ds = _softcap_torch(logits.float(), softcap)
    log_p = s / temperature - lse.unsqueeze(1)
    p = log_p.exp()
    grad = torch.zeros_like(p)
    if grad_logp is not None:
        g = grad_logp.float().unsqueeze(1)
        grad -= g * p
        grad.scatter_add_(1, targets.unsqueeze(1), g)
    if grad_entropy is not None:
        grad -= grad_entropy.float().unsqueeze(1) * p * (log_p + entropy.unsqueeze(1))
    grad /= temperature
    if ds is not None:
        grad *= ds
    logits.copy_(grad)


def chunked_logprobs_forward(hidden, weight, targets, temperature, softcap, chunk_size, with_entropy, use_triton):
    """Launcher: ``(logp, lse, entropy or None)``, fp32 per row, for hidden (N, H), weight (V, H),
    targets (N,) long, one chunk of logits at a time."""
    n_rows, n_vocab = hidden.shape[0], weight.shape[0]
    logp = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty(n_rows, dtype=torch.float32, device=hidden.device) if with_entropy else None
    if n_rows == 0:
        return logp, lse, entropy
    rows_forward = _rows_forward_triton if use_triton else _rows_forward_torch
    rows = chunk_rows(n_rows, n_vocab, hidden.element_size(), chunk_size)
    logits_buffer = torch.empty((min(rows, n_rows), n_vocab), dtype=hidden.dtype, device=hidden.device)
    for start in range(0, n_rows, rows):
        end = min(start + rows, n_rows)
        logits = logits_buffer[: end - start]
        torch.mm(hidden[start:end], weight.t(), out=logits)
        rows_forward(
            logits, targets[start:end], logp[start:end], lse[start:end],
            None if entropy is None else entropy[start:end], temperature, softcap,
        )
    return logp, lse, entropy


def chunked_logprobs_backward(
    grad_logp, grad_entropy, hidden, weight, targets, lse, entropy,
    temperature, softcap, chunk_size, need_grad_hidden, need_grad_weight, use_triton,
):
    """Launcher: ``(grad_hidden, grad_weight)`` (either None when not asked), recomputing each
    chunk's logits; ``grad_logp`` / ``grad_entropy`` are per-row upstream gradients or None."""
    n_rows, n_vocab = hidden.shape[0], weight.shape[0]
    grad_hidden = torch.zeros_like(hidden) if need_grad_hidden else None
    grad_weight = torch.zeros_like(weight) if need_grad_weight else None
    if n_rows == 0 or (grad_logp is None and grad_entropy is None):
        return grad_hidden, grad_weight
    rows_backward = _rows_backward_triton if use_triton else _rows_backward_torch
    grad_logp = None if grad_logp is None else grad_logp.reshape(-1).float().contiguous()
    grad_entropy = None if grad_entropy is None else grad_entropy.reshape(-1).float().contiguous()
    rows = chunk_rows(n_rows, n_vocab, hidden.element_size(), chunk_size)
    logits_buffer = torch.empty((min(rows, n_rows), n_vocab), dtype=hidden.dtype, device=hidden.device)
    for start in range(0, n_rows, rows):
        end = min(start + rows, n_rows)
        hidden_chunk = hidden[start:end]
        logits = logits_buffer[: end - start]
        torch.mm(hidden_chunk, weight.t(), out=logits)
        rows_backward(
            logits, targets[start:end], lse[start:end],
            None if grad_entropy is None else entropy[start:end],
            None if grad_logp is None else grad_logp[start:end],
            None if grad_entropy is None else grad_entropy[start:end],
            temperature, softcap,
        )
        if need_grad_hidden:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if need_grad_weight:
            grad_weight.addmm_(logits.t(), hidden_chunk)
    return grad_hidden, grad_weight


class _ChunkedLogprobsFunction(torch.autograd.Function):
    """logp = log_softmax(softcap(h W^T) / T)[y] (and H = entropy); the backward recomputes each
    chunk's logits: dz = [g (onehot - p) - g_H p (log p + H)] / T * softcap'; grad_h = dz W;
    grad_W = sum dz^T h."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, softcap, chunk_size, return_entropy, use_triton):
        ctx.set_materialize_grads(False)
        with torch.autocast(hidden.device.type, enabled=False):
            logp, lse, entropy = chunked_logprobs_forward(
                hidden, weight, targets, temperature, softcap, chunk_size, return_entropy, use_triton
            )
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.settings = temperature, softcap, chunk_size, use_triton
        return (logp, entropy) if return_entropy else logp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        temperature, softcap, chunk_size, use_triton = ctx.settings
        with torch.autocast(hidden.device.type, enabled=False):
            grad_hidden, grad_weight = chunked_logprobs_backward(
                grad_logp, grad_entropy, hidden, weight, targets, lse, entropy,
                temperature, softcap, chunk_size, ctx.needs_input_grad[0], ctx.needs_input_grad[1], use_triton,
            )
        return grad_hidden, grad_weight, None, None, None, None, None, None
