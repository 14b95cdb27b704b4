"""Fused linear cross-entropy: the LM-head projection and the loss without (tokens x vocab) logits.

Tokens are processed in chunks. For each chunk the logits ``z = h W^T (+ b)`` are computed in
the input dtype (fp32 accumulation), a Triton kernel turns every row into its loss and
overwrites the row, in place, with ``d loss / d z``, and the chunk's gradients follow at once:
``grad_h = dz W`` and ``grad_W += dz^T h``. Only the loss and the input gradients outlive the
forward; the backward multiplies them by ``grad_output``.

Per row with target ``y`` (optionally Gemma's soft cap ``z' = c tanh(z / c)``)::

    loss = logsumexp(z') - z'_y
    d loss / d z = (softmax(z') - onehot(y)) * (1 - tanh(z / c)^2) * scale

where ``scale`` is 1 for ``reduction="sum"`` and ``1 / (number of non-ignored targets)`` for
``"mean"``; rows whose target is ``ignore_index`` contribute zero loss and zero gradient. Any other
target outside ``[0, vocab)`` is rejected (``ValueError``) before any kernel runs.

The kernel evaluates ``t = tanh(x)``, ``x = z / c`` (correctly rounded division), to within 1.9
ulp of fp32 (``2 sigmoid(2x) - 1`` was up to 1.2e-7 off in absolute terms, thousands of ulp near 0,
and the cap multiplies that by ``c``). With ``e = exp(-2|x|)``::

    |x| < 0.625:  t = x + x s P(s),  s = x^2, P of degree 4 (below);  1 - t^2 as written
    otherwise:    t = sign(x) (1 - 2e / (1 + e));  1 - t^2 = 4e / (1 + e)^2 (no cancellation)

``P`` is an iteratively reweighted least-squares fit of ``(tanh(x) / x - 1) / s`` on
``[0, 0.625]``, relative error 4.4e-9, far below fp32's 6e-8. Checked exhaustively over every fp32
``x`` in ``[2^-13, 10]`` (below, ``t = x`` exactly; above, ``t = 1``) against fp64 ``tanh``, in fp32
arithmetic as the interpreter does it: ``t`` at most 0.78 ulp off on the polynomial branch and
1.8 ulp on the exponential one (rounding in ``1 + e``, the division and ``2e r`` dominate there);
``1 - t^2`` within 3.6e-7 relative. The same sweep of the compiled kernel on an H200 (Triton 3.6):
``t`` within 1.85 ulp (libdevice's ``tanh``, which the interpreter lacks: 1.82), ``1 - t^2`` within
1.1e-6 relative (Triton's GPU ``exp`` rounds ``x log2(e)`` first), ``c tanh(z / c)`` at ``c = 30``
within 2.4 ulp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._runtime import triton_enabled, warn_fallback
from ..constants import IGNORE_INDEX
from ._launch import MAX_BLOCK, LaunchPolicy, launch

LOGITS_CHUNK_BYTES = 256 * 2**20
"""Upper bound on one chunk's logits buffer (chunk rows x vocab x element size)."""

_LAUNCH = LaunchPolicy(max_block=MAX_BLOCK)


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """PyTorch reference: materialises the fp32 logits, then ``F.cross_entropy``."""
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction=reduction)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``softcap(hidden @ weight.T + bias)`` against ``target``, never holding
    more than one chunk of logits.

    hidden (N, H), weight (V, H), target (N,) int, bias (V,). Returns an fp32 scalar: the sum
    over non-ignored tokens, divided by their count for ``reduction="mean"`` (NaN when every
    token is ignored, as ``F.cross_entropy``; the gradients are then zero). ``chunk_size``
    overrides the rows per chunk (default: what fits ``LOGITS_CHUNK_BYTES``). No gradient is
    computed for a frozen weight (``requires_grad=False``) or a hidden state without grad.
    Under autocast the matmuls run in the autocast dtype; otherwise hidden is cast to
    weight's dtype. A target outside ``[0, V)`` other than ``ignore_index`` raises
    ``ValueError`` naming it (this costs one host read per call).
    """
    target = target.reshape(-1)
    _check_targets(target, weight.shape[0], ignore_index, "target")
    return _linear_cross_entropy(hidden, weight, target, bias, ignore_index, softcap, reduction, chunk_size)


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Causal-LM targets: ``labels`` shifted left by one along the last dim, ``ignore_index``
    appended (token t predicts label t + 1)."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()


_shift_labels = shift_labels  # causal_lm_loss's keyword argument of the same name shadows it


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    bias: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Hugging Face ``ForCausalLMLoss`` on ``lm_head(hidden)`` without materialising the logits.

    hidden (B, S, H), labels (B, S). ``shift_labels`` (already shifted targets) is used as given
    instead of shifting ``labels``. Mean over non-ignored tokens, or, when
    ``num_items_in_batch`` is given, the sum divided by it (token-exact gradient accumulation).
    A label used as a target that is outside ``[0, V)`` and not ``ignore_index`` raises
    ``ValueError`` naming its position in ``labels`` (or ``shift_labels``).
    """
    if shift_labels is None:
        target = _shift_labels(labels, ignore_index).to(hidden.device)
        _check_targets(target, weight.shape[0], ignore_index, "labels", shift=1)
    else:
        target = shift_labels.to(hidden.device)
        _check_targets(target, weight.shape[0], ignore_index, "shift_labels")
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = _linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1),
        bias, ignore_index, softcap, reduction, chunk_size,
    )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _check_targets(target: torch.Tensor, n_vocab: int, ignore_index: int, name: str, shift: int = 0) -> None:
    """Raise ``ValueError`` naming the first entry of ``target`` that is neither a class in
    ``[0, n_vocab)`` nor ``ignore_index`` (the kernel would otherwise read outside the row).

    One vectorised pass on the target's device and one host read of (found, value, position)
    for the whole call. ``shift`` is added to the reported last index (a shifted target's
    entry ``[..., i]`` is the caller's ``labels[..., i + shift]``)."""
    if target.numel() == 0:
        return
    bad = ((target < 0) | (target >= n_vocab)) & (target != ignore_index)
    first = bad.reshape(-1).to(torch.uint8).argmax()  # the first True, or 0 when there is none
    found, value, *position = torch.stack(
        (bad.reshape(-1)[first].long(), target.reshape(-1)[first].long(), *torch.unravel_index(first, target.shape))
    ).tolist()
    if found:
        position[-1] += shift
        raise ValueError(
            f"{name}[{', '.join(map(str, position))}] = {value} is not a class index: expected "
            f"0 <= {name} < {n_vocab} (the vocab size) or ignore_index={ignore_index}"
        )


def _linear_cross_entropy(hidden, weight, target, bias, ignore_index, softcap, reduction, chunk_size):
    """:func:`fused_linear_cross_entropy` on a flat target already checked by :func:`_check_targets`."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden (N, H) and weight (V, H), got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    else:
        hidden = hidden.to(weight.dtype)
    target = target.to(torch.long).contiguous()
    use_triton = triton_enabled(hidden, weight, target)
    if not use_triton:
        warn_fallback("fused_linear_cross_entropy")
    grad_wanted = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    if not grad_wanted:
        return fused_linear_cross_entropy_forward(
            hidden, weight, bias, target, ignore_index, softcap, reduction, chunk_size,
            False, False, False, use_triton,
        )[0]
    return _FusedLinearCrossEntropyFunction.apply(
        hidden, weight, bias, target, ignore_index, softcap, reduction, chunk_size, use_triton
    )


@triton.jit
def _tanh_and_derivative(x):
    """(tanh(x), 1 - tanh(x)^2) in fp32 to a few ulp: polynomial near 0, exponential beyond
    (formulas and error bounds in the module docstring)."""
    e = tl.exp(-2.0 * tl.abs(x))
    r = 1.0 / (1.0 + e)
    s = x * x
    p = -0.3333328068256378 + s * (
        0.13331443071365356 + s * (-0.053739726543426514 + s * (0.020639119669795036 + s * -0.005705019924789667))
    )
    tail = 1.0 - 2.0 * e * r
    near_zero = tl.abs(x) < 0.625
    t = tl.where(near_zero, x + x * (s * p), tl.where(x < 0.0, -tail, tail))
    return t, tl.where(near_zero, 1.0 - t * t, 4.0 * e * r * r)


@triton.jit
def _softcapped(z, softcap, HAS_SOFTCAP: tl.constexpr):
    """(c tanh(z / c), 1 - tanh(z / c)^2), or (z, 1) without a soft cap."""
    if HAS_SOFTCAP:
        t, dt = _tanh_and_derivative(tl.math.div_rn(z, softcap))
        return softcap * t, dt
    else:
        return z, 1.0


@triton.jit
def _fused_linear_cross_entropy_rows_kernel(
    logits_ptr, stride_row,
    target_ptr, loss_ptr, scale_ptr,
    n_vocab, ignore_index, softcap,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Per row: loss = logsumexp(z') - z'_y (online max/sum over vocab blocks), then, when asked,
    the row is overwritten with (softmax(z') - onehot(y)) * dz'/dz * scale. Ignored rows get
    zero loss and a zero gradient row. A target outside [0, n_vocab) (rejected before launch)
    reads nothing: its loss is NaN."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(target_ptr + row)
    if target != ignore_index:
        running_max = -float("inf")
        running_sum = 0.0
        for start in range(0, n_vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_vocab
            z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            z, _ = _softcapped(z, softcap, HAS_SOFTCAP)
            z = tl.where(mask, z, -float("inf"))
            new_max = tl.maximum(running_max, tl.max(z, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
            running_max = new_max
        in_vocab = (target >= 0) & (target < n_vocab)
        z_target = tl.load(row_ptr + target, mask=in_vocab, other=float("nan")).to(tl.float32)
        z_target, _ = _softcapped(z_target, softcap, HAS_SOFTCAP)
        tl.store(loss_ptr + row, tl.log(running_sum) + running_max - z_target)
        if COMPUTE_GRAD:
            scale = tl.load(scale_ptr).to(tl.float32)
            inv_sum = 1.0 / running_sum
            for start in range(0, n_vocab, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                mask = cols < n_vocab
                z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                z, dz = _softcapped(z, softcap, HAS_SOFTCAP)
                grad = tl.exp(z - running_max) * inv_sum - tl.where(cols == target, 1.0, 0.0)
                tl.store(row_ptr + cols, (grad * dz * scale).to(logits_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, n_vocab, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                zeros = tl.zeros((BLOCK_V,), dtype=logits_ptr.dtype.element_ty)
                tl.store(row_ptr + cols, zeros, mask=cols < n_vocab)


def _rows_loss_and_grad_triton(logits, target, loss, scale, ignore_index, softcap, compute_grad):
    """Triton: per-row loss into ``loss``; with ``compute_grad`` logits become d loss / d logits."""
    n_rows, n_vocab = logits.shape
    block_v, num_warps = _LAUNCH.settings(n_vocab)
    launch(
        _fused_linear_cross_entropy_rows_kernel, (n_rows,),
        logits, logits.stride(0),
        target, loss, scale,
        n_vocab, ignore_index, 1.0 if softcap is None else float(softcap),
        HAS_SOFTCAP=softcap is not None,
        COMPUTE_GRAD=compute_grad,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )


def _rows_loss_and_grad_torch(logits, target, loss, scale, ignore_index, softcap, compute_grad):
    """PyTorch twin of :func:`_rows_loss_and_grad_triton` (fp32 math on one chunk)."""
    z = logits.float()
    if softcap is not None:
        tanh = torch.tanh(z / softcap)
        z = softcap * tanh
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0).unsqueeze(1)
    row_loss = torch.logsumexp(z, dim=1) - z.gather(1, safe_target).squeeze(1)
    loss.copy_(torch.where(valid, row_loss, 0.0))
    if compute_grad:
        grad = torch.softmax(z, dim=1)
        grad.scatter_add_(1, safe_target, torch.full_like(safe_target, -1.0, dtype=grad.dtype))
        if softcap is not None:
            grad *= 1.0 - tanh * tanh
        grad *= torch.where(valid, scale, 0.0).unsqueeze(1)
        logits.copy_(grad)


def _chunk_rows(n_tokens: int, n_vocab: int, itemsize: int, chunk_size: int | None) -> int:
    """Rows per chunk: as many as fit LOGITS_CHUNK_BYTES, balanced so chunks are equal-sized."""
    max_rows = chunk_size or max(1, LOGITS_CHUNK_BYTES // (n_vocab * itemsize))
    n_chunks = triton.cdiv(n_tokens, max_rows)
    return triton.cdiv(n_tokens, max(n_chunks, 1))


def fused_linear_cross_entropy_forward(
    hidden, weight, bias, target, ignore_index, softcap, reduction, chunk_size,
    need_grad_hidden, need_grad_weight, need_grad_bias, use_triton,
):
    """Launcher, chunk by chunk: the loss (fp32 scalar) and, as asked, the gradients of hidden,
    weight and bias (or None) for ``grad_output = 1``; the rows run the Triton kernel when
    ``use_triton``, else :func:`_rows_loss_and_grad_torch`."""
    n_tokens = hidden.shape[0]
    n_vocab = weight.shape[0]
    valid_count = (target != ignore_index).sum()
    if reduction == "mean":
        scale = 1.0 / valid_count.float()
    else:
        scale = torch.ones((), dtype=torch.float32, device=hidden.device)
    compute_grad = need_grad_hidden or need_grad_weight or need_grad_bias
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_grad_hidden else None
    grad_weight = torch.zeros_like(weight) if need_grad_weight else None
    grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_grad_bias else None
    row_loss = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
    rows_loss_and_grad = _rows_loss_and_grad_triton if use_triton else _rows_loss_and_grad_torch

    rows = _chunk_rows(n_tokens, n_vocab, hidden.element_size(), chunk_size)
    logits_buffer = torch.empty((min(rows, n_tokens), n_vocab), dtype=hidden.dtype, device=hidden.device)
    for start in range(0, n_tokens, rows):
        end = min(start + rows, n_tokens)
        hidden_chunk = hidden[start:end]
        logits = logits_buffer[: end - start]
        if bias is None:
            torch.mm(hidden_chunk, weight.t(), out=logits)
        else:
            torch.addmm(bias, hidden_chunk, weight.t(), out=logits)
        rows_loss_and_grad(logits, target[start:end], row_loss[start:end], scale, ignore_index, softcap, compute_grad)
        if need_grad_hidden:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if need_grad_weight:
            grad_weight.addmm_(logits.t(), hidden_chunk)
        if need_grad_bias:
            grad_bias += logits.sum(dim=0, dtype=torch.float32)

    loss = row_loss.sum()
    if reduction == "mean":
        loss = loss / valid_count
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return loss, grad_hidden, grad_weight, grad_bias


def fused_linear_cross_entropy_backward(grad_output: torch.Tensor, grads: tuple) -> tuple:
    """The forward's ``(grad_hidden, grad_weight, grad_bias)`` (entries may be None) multiplied by
    ``grad_output``, in place."""
    for grad in grads:
        if grad is not None:
            grad.mul_(grad_output.to(grad.dtype))
    return grads


class _FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """loss = CE(softcap(h W^T + b), y). Gradients are computed chunk by chunk in the forward
    (d loss/dz = (softmax - onehot) * softcap' * scale; grad_h = dz W; grad_W = dz^T h;
    grad_b = sum_rows dz) and the backward only multiplies them by grad_output, in place: a
    second backward through the same graph is refused."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, softcap, reduction, chunk_size, use_triton):
        need_bias = bias is not None and ctx.needs_input_grad[2]
        with torch.autocast(hidden.device.type, enabled=False):
            loss, *grads = fused_linear_cross_entropy_forward(
                hidden, weight, bias, target, ignore_index, softcap, reduction, chunk_size,
                ctx.needs_input_grad[0], ctx.needs_input_grad[1], need_bias, use_triton,
            )
        ctx.grads = grads
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_cross_entropy supports a single backward per forward")
        grads, ctx.grads = ctx.grads, None
        grad_hidden, grad_weight, grad_bias = fused_linear_cross_entropy_backward(grad_output, grads)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None
