"""GGUF k-quants written by our own vectorised quantiser (torch, any number of CPU threads).

Block layouts are byte-compatible with ggml's ``block_q4_K`` / ``block_q5_K`` / ``block_q6_K``
(super-blocks of 256 values along a row; the ``gguf`` package's dequantisers read them back):

* **Q4_K** (144 bytes): fp16 ``d``, fp16 ``dmin``, 12 bytes of eight 6-bit scales and eight 6-bit
  mins, 128 bytes of 4-bit codes. Sub-block ``j`` (32 values) decodes ``d*sc[j]*q - dmin*m[j]``.
  Codes of sub-blocks ``2g`` / ``2g+1`` share bytes ``32g..32g+31`` (low / high nibble).
* **Q5_K** (176 bytes): as Q4_K plus 32 bytes of fifth bits (bit ``j`` of byte ``l`` is the high
  bit of value ``l`` of sub-block ``j``), before the 4-bit codes; codes 0..31.
* **Q6_K** (210 bytes): 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, sixteen int8
  scales (sub-blocks of 16), fp16 ``d``; value = ``d*sc[i]*(q - 32)``. Within each half of 128
  values, byte ``l`` of the nibbles holds values ``l`` (low) and ``64+l`` (high); byte ``l`` of
  the pairs holds values ``l, 32+l, 64+l, 96+l`` in bits 0-1, 2-3, 4-5, 6-7.

Quantisation: asymmetric sub-blocks (Q4_K, Q5_K) start from the min-max range (the min clamped at
most 0, as ggml keeps it) and symmetric ones (Q6_K) from the largest magnitude mapped to -32; then
:data:`REFINE_STEPS` rounds of alternating least squares (codes for the scale and offset, then the
least-squares scale and offset for the codes), which never increase the squared error.
The per-sub-block scales are then quantised (6-bit with an fp16 super-scale, or int8) and the
codes recomputed against the scales as stored.

:func:`mixture_type` applies the tensor-type rules llama.cpp's ``llama-quant`` uses for the
``Q4_K_M`` / ``Q5_K_M`` / ``Q6_K`` file types (output / tied embedding in Q6_K, ``attn_v`` and
``ffn_down`` of a subset of layers in Q6_K, and the fallbacks for rows not a multiple of 256).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import gguf
import numpy as np
import torch

QK_K = 256  # values per k-quant super-block
REFINE_STEPS = 2  # alternating least-squares rounds per sub-block
_CHUNK_ELEMENTS = 1 << 20  # rows are quantised in chunks of about this many values (one per worker at a time)

Q = gguf.GGMLQuantizationType


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sub-block (last dim) sum of ``a * b``, keeping the dim (one fused pass)."""
    return torch.einsum("...i,...i->...", a, b).unsqueeze(-1)


def _inverse(scale: torch.Tensor) -> torch.Tensor:
    """``1 / scale``, 0 where the scale is 0 (a sub-block of zeros gets code 0 / the offset)."""
    return torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, 1.0), 0.0)


def _codes(x: torch.Tensor, offset: torch.Tensor | None, inverse: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """``round((x - offset) / scale)`` clamped to ``low..high``, as float (in place on one temporary)."""
    shifted = x * inverse if offset is None else (x - offset).mul_(inverse)
    return shifted.round_().clamp_(low, high)


def _fit_affine(x: torch.Tensor, levels: int, refine_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block (last dim) scale ``s >= 0`` and offset ``b <= 0`` with ``x ~ s*q + b``, ``q`` in ``0..levels``."""
    lo = x.amin(-1, keepdim=True).clamp_(max=0.0)
    scale = (x.amax(-1, keepdim=True) - lo) / levels
    offset = lo
    n = x.shape[-1]
    sum_x = x.sum(-1, keepdim=True)
    for _ in range(refine_steps):
        q = _codes(x, offset, _inverse(scale), 0, levels)
        sum_q, sum_qq, sum_xq = q.sum(-1, keepdim=True), _dot(q, q), _dot(x, q)
        det = n * sum_qq - sum_q * sum_q
        ok = det > 0
        safe_det = torch.where(ok, det, 1.0)
        new_scale = torch.where(ok, (n * sum_xq - sum_q * sum_x) / safe_det, scale)
        new_offset = torch.where(ok, (sum_qq * sum_x - sum_q * sum_xq) / safe_det, offset)
        # the offset must stay <= 0 (stored as a non-negative min): refit the scale alone at offset 0
        positive = new_offset > 0
        only_scale = torch.where(sum_qq > 0, sum_xq / torch.where(sum_qq > 0, sum_qq, 1.0), scale)
        new_scale = torch.where(positive, only_scale, new_scale)
        new_offset = torch.where(positive, 0.0, new_offset)
        keep = new_scale <= 0  # degenerate fit: keep the previous one
        scale = torch.where(keep, scale, new_scale)
        offset = torch.where(keep, offset, new_offset)
    return scale, offset


def _fit_symmetric(x: torch.Tensor, refine_steps: int) -> torch.Tensor:
    """Per sub-block signed scale ``s`` with ``x ~ s*q``, ``q`` in ``-32..31`` (the largest magnitude maps to -32)."""
    top, bottom = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
    scale = torch.where(-bottom > top, bottom, top) / -32
    for _ in range(refine_steps):
        q = _codes(x, None, _inverse(scale), -32, 31)
        sum_qq = _dot(q, q)
        scale = torch.where(sum_qq > 0, _dot(x, q) / torch.where(sum_qq > 0, sum_qq, 1.0), scale)
    return scale


def _fp16(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp16 bytes as uint8 pairs, the fp16 value back in fp32)."""
    half = values.to(torch.float16)
    return half.view(torch.uint8).reshape(*values.shape[:-1], 2), half.float()


def _quantize_6bit(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-negative per-sub-block values (.., 8) as 6-bit codes times an fp16 super-scale.

    Returns (fp16 bytes (.., 2), codes (.., 8) in 0..63, the fp16 super-scale as fp32 (.., 1)).
    """
    top = values.amax(-1, keepdim=True)
    raw, super_scale = _fp16(top / 63)
    codes = torch.where(super_scale > 0, (values / super_scale.clamp(min=1e-30)).round().clamp(0, 63), 0.0)
    return raw, codes.to(torch.uint8), super_scale


def _pack_scales_mins(sc: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins per block (.., 8) -> ggml's 12-byte ``scales`` field."""
    low_sc, high_sc = sc[..., :4], sc[..., 4:]
    low_m, high_m = mins[..., :4], mins[..., 4:]
    first = low_sc | ((high_sc >> 4) << 6)
    second = low_m | ((high_m >> 4) << 6)
    third = (high_sc & 0xF) | ((high_m & 0xF) << 4)
    return torch.cat([first, second, third], dim=-1)


def _quantize_affine_k(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Q4_K (bits 4) or Q5_K (bits 5) blocks of ``x`` (blocks, 256) as uint8 (blocks, 144 or 176)."""
    levels = (1 << bits) - 1
    sub = x.reshape(-1, 8, 32)
    scale, offset = _fit_affine(sub, levels, REFINE_STEPS)
    d_raw, sc, d = _quantize_6bit(scale[..., 0])
    dmin_raw, mq, dmin = _quantize_6bit((-offset[..., 0]).clamp(min=0.0))
    step = (d * sc.float()).unsqueeze(-1)
    shift = (dmin * mq.float()).unsqueeze(-1)
    q = _codes(sub, -shift, _inverse(step), 0, levels).to(torch.uint8)
    low = q & 0xF
    nibbles = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(-1, 128)  # sub-blocks 2g (low) and 2g+1 (high)
    parts = [d_raw, dmin_raw, _pack_scales_mins(sc, mq)]
    if bits == 5:
        high = q >> 4  # (blocks, 8, 32), 0 or 1
        bits = high[:, 0]
        for j in range(1, 8):
            bits = bits | (high[:, j] << j)
        parts.append(bits)
    parts.append(nibbles)
    return torch.cat(parts, dim=-1)


def _quantize_q6_k(x: torch.Tensor) -> torch.Tensor:
    """Q6_K blocks of ``x`` (blocks, 256) as uint8 (blocks, 210)."""
    sub = x.reshape(-1, 16, 16)
    scale = _fit_symmetric(sub, REFINE_STEPS)[..., 0]  # (blocks, 16), signed
    top = scale.abs().amax(-1, keepdim=True)
    d_raw, d = _fp16(top / 127)
    sc = torch.where(d > 0, (scale / d.clamp(min=1e-30)).round().clamp(-127, 127), 0.0)
    q = _codes(sub, None, _inverse((d * sc).unsqueeze(-1)), -32, 31)
    q = q.add_(32).to(torch.uint8).reshape(-1, 2, 128)  # two halves of 128 values
    low = q & 0xF
    nibbles = (low[..., :64] | (low[..., 64:] << 4)).reshape(-1, 128)
    pairs = (q >> 4).reshape(-1, 2, 4, 32)
    high = (pairs[:, :, 0] | (pairs[:, :, 1] << 2) | (pairs[:, :, 2] << 4) | (pairs[:, :, 3] << 6)).reshape(-1, 64)
    return torch.cat([nibbles, high, sc.to(torch.int8).view(torch.uint8), d_raw], dim=-1)


_KQUANTIZERS = {
    Q.Q4_K: lambda blocks: _quantize_affine_k(blocks, 4),
    Q.Q5_K: lambda blocks: _quantize_affine_k(blocks, 5),
    Q.Q6_K: _quantize_q6_k,
}
K_QUANTS = frozenset(_KQUANTIZERS)


def quantize_k(weight: torch.Tensor, qtype: Q, threads: int | None = None) -> np.ndarray:
    """A 2-D weight (rows a multiple of 256 wide) as ``qtype`` blocks: uint8 ``(rows, bytes per row)``.

    Row chunks of about :data:`_CHUNK_ELEMENTS` values are quantised by ``threads`` workers (default:
    torch's thread count), each running torch single-threaded: the many small per-sub-block ops scale
    this way, where intra-op threads would wait on each other at every op.
    """
    if qtype not in _KQUANTIZERS:
        raise ValueError(f"quantize_k handles {sorted(t.name for t in K_QUANTS)}, not {qtype.name}")
    if weight.dim() != 2 or weight.shape[1] % QK_K:
        raise ValueError(
            f"{qtype.name} needs a 2-D weight with rows a multiple of {QK_K}, got shape {tuple(weight.shape)}"
        )
    rows, cols = weight.shape
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    out = torch.empty(rows, cols // QK_K * block_bytes, dtype=torch.uint8)
    step = max(1, _CHUNK_ELEMENTS // cols)
    workers = threads or torch.get_num_threads()

    def quantize_rows(start: int) -> None:
        torch.set_num_threads(1)  # this worker's own ops: one thread
        with torch.no_grad():
            chunk = weight[start : start + step].float().reshape(-1, QK_K)
            out[start : start + step] = _KQUANTIZERS[qtype](chunk).reshape(-1, out.shape[1])

    previous = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(quantize_rows, range(0, rows, step)))
    finally:
        torch.set_num_threads(previous)
    return out.numpy()


# ---------------------------------------------------------------- llama.cpp's tensor-type mixture

# file type name -> (base tensor type, llama.cpp file type)
MIXTURES = {
    "q4_k_m": (Q.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_M),
    "q5_k_m": (Q.Q5_K, gguf.LlamaFileType.MOSTLY_Q5_K_M),
    "q6_k": (Q.Q6_K, gguf.LlamaFileType.MOSTLY_Q6_K),
}
# a k-quant tensor whose rows are not a multiple of 256 falls back to this 32-wide type (then F16)
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def mixture_type(mixture: str, gguf_name: str, row_width: int, layer: int | None, n_layers: int, tied: bool) -> Q:
    """The tensor type llama.cpp's quantiser gives the 2-D weight ``gguf_name`` in a ``mixture`` file."""
    qtype = MIXTURES[mixture][0]
    more_bits = mixture in ("q4_k_m", "q5_k_m") and layer is not None and _more_bits(layer, n_layers)
    is_output = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
    if is_output:
        if row_width % QK_K:
            return Q.Q8_0 if row_width % 32 == 0 else Q.F16
        qtype = Q.Q6_K
    elif more_bits and gguf_name.endswith(("attn_v.weight", "ffn_down.weight")):
        qtype = Q.Q6_K
    if row_width % QK_K:
        qtype = _FALLBACK[qtype]
        if row_width % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = Q.F16
    return qtype
