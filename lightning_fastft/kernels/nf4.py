"""Dequantisation of bitsandbytes 4-bit (NF4 / FP4) weights in one Triton kernel.

bitsandbytes stores a 4-bit weight of ``n`` elements as ``ceil(n / 2)`` bytes, flat in row-major
order: element ``2k`` in the high nibble of byte ``k``, element ``2k + 1`` in its low nibble.
Each nibble indexes the 16-entry code table (``quant_state.code``: the NF4 or FP4 values in
[-1, 1]); element ``i`` is ``code[nibble_i] * absmax[i // blocksize]``.

With double quantisation (``compress_statistics=True``, ``quant_state.nested``) the absmax
values are themselves 8-bit codes: ``absmax[b] = code2[absmax_u8[b]] * absmax2[b // blocksize2]
+ offset`` with ``code2``/``absmax2``/``blocksize2`` from ``quant_state.state2`` and the scalar
``quant_state.offset``.

Everything is computed in fp32 with the same operation order as bitsandbytes (multiply, then
add the offset, then multiply by the code value, no fused multiply-add) and rounded once to the
output dtype, so the result is bit-identical to ``bitsandbytes.functional.dequantize_4bit``.
Dequantisation has no backward: 4-bit weights are frozen.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime import triton_enabled, warn_fallback
from ._launch import launch

_BYTES_PER_PROGRAM = 1024


def dequantize_4bit_reference(weight_packed: torch.Tensor, quant_state, out_dtype: torch.dtype | None = None):
    """``bitsandbytes.functional.dequantize_4bit``, then a cast to ``out_dtype`` if it differs
    from ``quant_state.dtype``."""
    import bitsandbytes.functional as bnb_functional

    out = bnb_functional.dequantize_4bit(_plain_tensor(weight_packed), quant_state)
    return out if out_dtype is None else out.to(out_dtype)


def dequantize_4bit(weight_packed: torch.Tensor, quant_state, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense weight of shape ``quant_state.shape`` from a bitsandbytes 4-bit packed weight
    (a ``Params4bit`` or its packed uint8 tensor) and its ``QuantState``.

    ``out_dtype`` defaults to ``quant_state.dtype``. Runs the Triton kernel when possible, else
    bitsandbytes' own dequantisation (bit-identical when ``out_dtype`` is ``quant_state.dtype``).
    """
    out_dtype = quant_state.dtype if out_dtype is None else out_dtype
    if quant_state.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_state.quant_type!r}")
    packed = _packed_bytes(weight_packed)
    tensors = [packed, quant_state.absmax, quant_state.code]
    if quant_state.nested:
        tensors += [quant_state.state2.absmax, quant_state.state2.code, quant_state.offset]
    if not triton_enabled(*tensors):
        warn_fallback("dequantize_4bit")
        return dequantize_4bit_reference(weight_packed, quant_state, out_dtype)
    return dequantize_4bit_forward(packed, quant_state, out_dtype)


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr, absmax_ptr, code_ptr,
    absmax2_ptr, code2_ptr, offset_ptr,
    out_ptr,
    n_elements, n_bytes,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    BYTES: tl.constexpr,
):
    """out[2k] = code[byte_k >> 4] * scale_k, out[2k+1] = code[byte_k & 15] * scale_k, with
    scale_k the absmax of element 2k's block (decoded from its 8-bit code when DOUBLE_QUANT).
    One program decodes BYTES packed bytes (2 * BYTES elements)."""
    byte_idx = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    byte_mask = byte_idx < n_bytes
    packed = tl.load(packed_ptr + byte_idx, mask=byte_mask, other=0).to(tl.int32)
    high = tl.load(code_ptr + (packed >> 4)).to(tl.float32)
    low = tl.load(code_ptr + (packed & 15)).to(tl.float32)

    block = (byte_idx * 2) // BLOCKSIZE  # blocksize is even: both nibbles share one block
    if DOUBLE_QUANT:
        absmax_code = tl.load(absmax_ptr + block, mask=byte_mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + absmax_code).to(tl.float32)
        scale = scale * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=byte_mask, other=0.0).to(tl.float32)
        scale = scale + tl.load(offset_ptr).to(tl.float32)
    else:
        scale = tl.load(absmax_ptr + block, mask=byte_mask, other=0.0).to(tl.float32)

    values = tl.interleave(high * scale, low * scale)
    out_idx = tl.program_id(0).to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + out_idx, values.to(out_ptr.dtype.element_ty), mask=out_idx < n_elements)


def _plain_tensor(weight_packed: torch.Tensor) -> torch.Tensor:
    """The packed data of a ``Params4bit`` (or the tensor itself when it is not a Parameter)."""
    return weight_packed.data if isinstance(weight_packed, torch.nn.Parameter) else weight_packed


def _packed_bytes(weight_packed: torch.Tensor) -> torch.Tensor:
    """The packed weight as a flat uint8 tensor (bitsandbytes may store it in another dtype)."""
    packed = _plain_tensor(weight_packed).contiguous()
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    return packed.reshape(-1)


def dequantize_4bit_forward(packed: torch.Tensor, quant_state, out_dtype: torch.dtype) -> torch.Tensor:
    """Triton launcher: the dense ``out_dtype`` weight from the flat uint8 ``packed`` bytes (see
    :func:`_packed_bytes`) and the ``QuantState``."""
    out = torch.empty(tuple(quant_state.shape), dtype=out_dtype, device=packed.device)
    n_elements = out.numel()
    if n_elements == 0:
        return out
    if quant_state.blocksize % 2:
        raise ValueError(f"blocksize must be even, got {quant_state.blocksize}")
    n_bytes = (n_elements + 1) // 2
    if packed.numel() < n_bytes:
        raise ValueError(f"packed weight holds {packed.numel()} bytes, {n_bytes} needed for {tuple(out.shape)}")
    if quant_state.nested:
        state2 = quant_state.state2
        absmax2, code2, offset, blocksize2 = state2.absmax, state2.code, quant_state.offset, state2.blocksize
    else:  # unused pointers: any valid tensor
        absmax2 = code2 = offset = quant_state.absmax
        blocksize2 = 1
    grid = (triton.cdiv(n_bytes, _BYTES_PER_PROGRAM),)
    launch(
        _dequantize_4bit_kernel, grid,
        packed, quant_state.absmax, quant_state.code,
        absmax2, code2, offset,
        out,
        n_elements, n_bytes,
        BLOCKSIZE=quant_state.blocksize,
        BLOCKSIZE2=blocksize2,
        DOUBLE_QUANT=bool(quant_state.nested),
        BYTES=_BYTES_PER_PROGRAM,
        enable_fp_fusion=False,  # bitsandbytes rounds the product before adding the offset
    )
    return out
