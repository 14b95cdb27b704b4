"""RMSNorm with a fused Triton forward and backward.

Two numerics, matching Hugging Face:

* ``casting="llama"`` (``LlamaRMSNorm``): ``y = (w + offset) * (x.float() * rstd).to(x.dtype)``;
  the output dtype is ``torch.promote_types(x.dtype, w.dtype)``.
* ``casting="gemma"`` (``GemmaRMSNorm`` with ``offset=1.0``):
  ``y = ((x.float() * rstd) * (offset + w.float())).to(x.dtype)``.

with ``rstd = rsqrt(mean(x.float() ** 2) + eps)`` over the last dimension. Statistics and
gradients accumulate in fp32; the forward keeps only x, w and the per-row fp32 ``rstd``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime import triton_enabled, warn_fallback
from ._launch import LaunchPolicy, launch

CASTINGS = ("llama", "gemma")

_LAUNCH = LaunchPolicy(programs_per_sm=2)  # backward: fastest of 1-8 per SM on an H100 at 2048 and 8192 rows of 4096


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, casting: str = "llama"
) -> torch.Tensor:
    """Plain PyTorch RMSNorm with the same numerics as the Triton op."""
    _check_casting(casting)
    x_fp32 = x.float()
    x_hat = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + eps)
    scale = weight.float() + offset
    if casting == "gemma":
        return (x_hat * scale).to(x.dtype)
    return (scale * x_hat.to(x.dtype).float()).to(torch.promote_types(x.dtype, weight.dtype))


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, casting: str = "llama"
) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` (any leading shape), differentiable in x and weight.

    Runs the Triton kernels where :func:`triton_enabled`, otherwise :func:`rms_norm_reference`.
    An ``x`` whose last dimension is not contiguous is copied to a contiguous layout first.
    """
    _check_casting(casting)
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} != ({x.shape[-1]},)")
    if not triton_enabled(x, weight):
        warn_fallback("rms_norm")
        return rms_norm_reference(x, weight, eps, offset, casting)
    return _RMSNormFunction.apply(x, weight, eps, offset, casting)


def _check_casting(casting: str) -> None:
    if casting not in CASTINGS:
        raise ValueError(f"rms_norm: casting must be one of {CASTINGS}, got {casting!r}")


@triton.jit
def _rms_norm_forward_kernel(
    x_ptr,
    weight_ptr,
    y_ptr,
    rstd_ptr,
    x_row_stride,
    y_row_stride,
    n_rows,
    n_cols,
    eps,
    offset,
    GEMMA_CASTING: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """ROWS rows per program: rstd = rsqrt(mean(x^2) + eps), y = (w + offset) * x * rstd.

    Saves the fp32 rstd of each row; the backward recomputes x_hat = x * rstd from it.
    """
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(weight_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32) + offset
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    x_hat = x * rstd[:, None]
    if not GEMMA_CASTING:  # Llama: x_hat is rounded to the input dtype before the weight
        x_hat = x_hat.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)
    y = (x_hat * scale[None, :]).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows[:, None] * y_row_stride + cols[None, :], y, mask=mask)


@triton.jit
def _rms_norm_backward_kernel(
    grad_ptr,
    x_ptr,
    weight_ptr,
    rstd_ptr,
    dx_ptr,
    dw_partial_ptr,
    grad_row_stride,
    x_row_stride,
    dx_row_stride,
    n_rows,
    n_cols,
    offset,
    rows_per_program,
    GEMMA_CASTING: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Each program walks a contiguous chunk of rows, ROWS at a time.

    With w' = w + offset and x_hat = x * rstd:
      dx = rstd * (g * w' - x_hat * mean(g * w' * x_hat))    (per row)
      dw = sum_rows(g * x_hat)   (x_hat rounded to x.dtype for Llama casting, as in the forward)
    dw is accumulated in fp32 per program into dw_partial[program]; the caller sums the rows.
    """
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    scale = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    row_start = program.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for first in range(row_start, row_end, ROWS):
        rows = first + tl.arange(0, ROWS)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        grad = tl.load(grad_ptr + rows[:, None] * grad_row_stride + cols[None, :], mask=mask, other=0.0)
        x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        x_hat = x * rstd[:, None]
        grad_scaled = grad.to(tl.float32) * scale[None, :]
        dot = tl.sum(grad_scaled * x_hat, axis=1) / n_cols
        dx = rstd[:, None] * (grad_scaled - x_hat * dot[:, None])
        tl.store(dx_ptr + rows[:, None] * dx_row_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            if not GEMMA_CASTING:
                x_hat = x_hat.to(x_ptr.dtype.element_ty).to(tl.float32)
            dw_acc += grad.to(tl.float32) * x_hat
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + program * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


def _as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """(..., n_cols) -> (rows, n_cols) with a unit column stride (a view when possible)."""
    rows = t.reshape(-1, n_cols)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, casting: str = "llama"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launcher: ``(y, x_rows, rstd)`` with ``y`` a new tensor of x's shape, ``x_rows`` x as
    (rows, n_cols) with a unit column stride and ``rstd`` its fp32 per-row statistic (the two
    tensors :func:`rms_norm_backward` reads)."""
    n_cols = x.shape[-1]
    x_rows = _as_rows(x, n_cols)
    weight = weight.contiguous()
    gemma = casting == "gemma"
    out_dtype = x.dtype if gemma else torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)  # not a view: RoPE may write into it
    y_rows = y.view(-1, n_cols)
    rstd = torch.empty(x_rows.shape[0], dtype=torch.float32, device=x.device)
    n_rows = x_rows.shape[0]
    block, num_warps = _LAUNCH.settings(n_cols)
    rows = _LAUNCH.rows_at_once(block)
    if n_rows > 0:
        launch(
            _rms_norm_forward_kernel, (triton.cdiv(n_rows, rows),),
            x_rows, weight, y_rows, rstd, x_rows.stride(0), y_rows.stride(0), n_rows, n_cols, eps, offset,
            GEMMA_CASTING=gemma, ROWS=rows, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
    return y, x_rows, rstd


def rms_norm_backward(
    grad_y: torch.Tensor,
    x_rows: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float = 0.0,
    casting: str = "llama",
    compute_dw: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton launcher: ``(dx_rows, dw)`` from the upstream gradient and :func:`rms_norm_forward`'s
    ``x_rows`` and ``rstd``; ``dx_rows`` is (rows, n_cols), ``dw`` is ``None`` unless
    ``compute_dw``. ``weight`` must be contiguous."""
    n_rows, n_cols = x_rows.shape
    grad_rows = _as_rows(grad_y, n_cols)
    dx_rows = torch.empty(x_rows.shape, dtype=x_rows.dtype, device=x_rows.device)
    n_programs = _LAUNCH.persistent_programs(n_rows, x_rows.device)
    dw_partial = (
        torch.empty((n_programs, n_cols), dtype=torch.float32, device=x_rows.device)
        if compute_dw
        else rstd  # placeholder pointer, never written
    )
    block, num_warps = _LAUNCH.settings(n_cols)
    if n_rows > 0:
        launch(
            _rms_norm_backward_kernel, (n_programs,),
            grad_rows, x_rows, weight, rstd, dx_rows, dw_partial,
            grad_rows.stride(0), x_rows.stride(0), dx_rows.stride(0),
            n_rows, n_cols, offset, triton.cdiv(n_rows, n_programs),
            GEMMA_CASTING=casting == "gemma", COMPUTE_DW=compute_dw, ROWS=_LAUNCH.rows_at_once(block), BLOCK=block,
            num_warps=num_warps,
        )  # fmt: skip
    dw = None
    if compute_dw:
        dw = dw_partial.sum(0).to(weight.dtype) if n_rows > 0 else torch.zeros_like(weight)
    return dx_rows, dw


class _RMSNormFunction(torch.autograd.Function):
    """y = x_hat * (w + offset) with x_hat = x * rstd; backward (``_rms_norm_backward_kernel``)
    per row ``dx = rstd * (g w' - x_hat * mean(g w' x_hat))`` with w' = w + offset, and
    ``dw = sum_rows(g * x_hat)``."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset, casting):
        weight = weight.contiguous()
        y, x_rows, rstd = rms_norm_forward(x, weight, eps, offset, casting)
        ctx.save_for_backward(x_rows, weight, rstd)
        ctx.offset, ctx.casting, ctx.x_shape = offset, casting, x.shape
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x_rows, weight, rstd = ctx.saved_tensors
        dx_rows, dw = rms_norm_backward(
            grad_y, x_rows, weight, rstd, ctx.offset, ctx.casting, compute_dw=ctx.needs_input_grad[1]
        )
        return dx_rows.view(ctx.x_shape), dw, None, None, None
