"""Varlen attention for packed rows, registered with transformers as ``attn_implementation="fastft_varlen"``.

Every token attends (causally, within the sliding window when the layer has one) only to tokens of
its own segment. Segment boundaries come from, in order of preference:

1. ``cu_seq_lens_q`` (int boundaries over the flattened B*S tokens, as emitted by
   :class:`lightning_fastft.data.PackedCollator` and HF's ``DataCollatorWithFlattening``);
2. ``position_ids``: a new segment wherever a position is 0 or does not follow its predecessor;
3. row starts, plus every change of a 2D padding mask (so left/right padding runs are segments of
   their own and real tokens never see them).

Backends, first applicable wins:

* ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 on packed (T, H, D)
  tensors; CUDA, fp16/bf16, no softcap, no dropout, sliding window only where the installed torch
  takes ``window_size``);
* ``flex``: compiled FlexAttention with a document mask (CUDA; softcap as a score_mod);
* ``dense``: SDPA (or an explicit softmax for softcap and attention sinks) with a dense
  block-diagonal causal mask; the CPU path, and the path for dropout, KV-cache decoding (query
  shorter than key: no packing, keys end-aligned as with a dynamic cache) and gpt-oss's attention
  sinks (``s_aux``: one learned logit per head that joins every softmax and takes no value,
  exactly as Hugging Face's eager gpt-oss attention; varlen and flex have no sink path here).

Registering adds names to transformers' ``AttentionInterface``/``AttentionMaskInterface`` registries
(their extension point); only models switched with :func:`use_varlen_attention` use them, and models
given :func:`route_packed_batches` (every causal LM that ``patch_model`` finds) for their packed batches.
"""

from __future__ import annotations

import copy
import functools
import inspect
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedConfig, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from lightning_fastft._hf import find_hf_model
from lightning_fastft.architectures import ARCHITECTURES

ATTN_IMPLEMENTATION = "fastft_varlen"

try:
    from torch.nn.attention.varlen import varlen_attn

    _VARLEN_PARAMS = frozenset(inspect.signature(varlen_attn).parameters)
except ImportError:  # torch < 2.9
    varlen_attn = None
    _VARLEN_PARAMS = frozenset()

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - torch >= 2.5 always has it
    flex_attention = None

_compiled_flex_attention = None


@dataclass(frozen=True)
class Segments:
    """Which segment each token belongs to, in the three forms the backends need."""

    ids: torch.Tensor  # (B, S) int, numbered across the flattened batch
    cu_seq_lens: torch.Tensor  # (N + 1,) int32 boundaries over the flattened batch
    max_length: int


_segments_cache: tuple | None = None


def find_segments(
    batch: int,
    seq_len: int,
    device: torch.device,
    *,
    cu_seq_lens: torch.Tensor | None = None,
    max_length: int | None = None,
    position_ids: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
) -> Segments:
    """Segments of a (batch, seq_len) block of tokens (see the module docstring for the rules).

    Every layer of one forward passes the same ``cu_seq_lens``/``position_ids`` tensor, so the last
    result is reused while that tensor object is alive and unmodified.
    """
    global _segments_cache
    source = cu_seq_lens if cu_seq_lens is not None else position_ids
    key = (batch, seq_len, None if source is None else source._version, padding_mask)
    if source is not None and _segments_cache is not None:
        cached_source, cached_key, cached = _segments_cache
        if cached_source() is source and cached_key[:3] == key[:3] and cached_key[3] is padding_mask:
            return cached

    starts = torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
    starts[:, 0] = True
    if cu_seq_lens is not None:
        boundaries = cu_seq_lens[:-1].to(device=device, dtype=torch.long)
        starts.view(-1)[boundaries[boundaries < batch * seq_len]] = True
    elif position_ids is not None:
        positions = position_ids.to(device).expand(batch, seq_len)
        starts[:, 1:] |= (positions[:, 1:] == 0) | (positions[:, 1:] != positions[:, :-1] + 1)
    if padding_mask is not None:
        starts[:, 1:] |= padding_mask[:, 1:] != padding_mask[:, :-1]

    flat_starts = starts.view(-1)
    ids = (flat_starts.cumsum(0) - 1).view(batch, seq_len)
    boundaries = torch.nonzero(flat_starts).view(-1)
    total = torch.tensor([batch * seq_len], device=device)
    cu = torch.cat([boundaries, total]).to(torch.int32)
    if max_length is None or cu_seq_lens is None:
        max_length = int((cu[1:] - cu[:-1]).max())
    segments = Segments(ids=ids, cu_seq_lens=cu, max_length=max_length)
    if source is not None:
        _segments_cache = (weakref.ref(source), key, segments)
    return segments


def _allowed_mask(
    q_len: int,
    k_len: int,
    device: torch.device,
    *,
    causal: bool,
    sliding_window: int | None,
    segment_ids: torch.Tensor | None,
    key_valid: torch.Tensor | None,
) -> torch.Tensor:
    """Boolean (B or 1, q_len, k_len) mask of the keys each query may attend to (keys end-aligned)."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    allowed = k_pos <= q_pos if causal else torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if sliding_window is not None:
        allowed = allowed & ((q_pos - k_pos).abs() < sliding_window)
    allowed = allowed[None]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if key_valid is not None:
        # A padding query may have no valid key at all: let it see itself instead of producing NaN.
        allowed = (allowed & key_valid[:, None, :]) | (k_pos == q_pos)[None]
    return allowed


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


def _dense_attention(query, key, value, allowed, scaling, dropout, softcap, sinks=None):
    """Attention over (B, H, S, D) with a boolean (B, S_q, S_k) mask, or a caller's 4D mask
    (boolean, or additive floats); softmax in fp32 for softcap and sinks. A sink (one logit per
    head) joins each row's softmax as an extra column that is dropped before the values."""
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    mask = allowed[:, None] if allowed.dim() == 3 else allowed
    if softcap is None and sinks is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    else:
        scores = torch.matmul(query, key.transpose(-1, -2)).float() * scaling
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        if sinks is None:
            probs = scores.softmax(-1)
        else:
            sink_column = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
            probs = torch.cat([scores, sink_column], dim=-1).softmax(-1)[..., :-1]
        probs = F.dropout(probs, p=dropout, training=dropout > 0).to(value.dtype)
        out = torch.matmul(probs, value)
    return out.transpose(1, 2)


def _varlen_attention(query, key, value, segments, scaling, causal, sliding_window):
    """FlashAttention varlen over the flattened batch: (B, H, S, D) -> (B, S, H, D)."""
    batch, heads, seq_len, head_dim = query.shape
    kv_heads = key.shape[1]
    kwargs = {}
    if "window_size" in _VARLEN_PARAMS:
        left = -1 if sliding_window is None else sliding_window - 1
        kwargs["window_size"] = (left, 0 if causal else left)
    else:
        kwargs["is_causal"] = causal
    if "scale" in _VARLEN_PARAMS:
        kwargs["scale"] = scaling
    else:
        query = query * (scaling * head_dim**0.5)
    if "enable_gqa" in _VARLEN_PARAMS:
        kwargs["enable_gqa"] = heads != kv_heads
    else:
        key, value = _repeat_kv(key, heads // kv_heads), _repeat_kv(value, heads // kv_heads)

    def packed(states):
        return states.transpose(1, 2).reshape(batch * seq_len, states.shape[1], head_dim)

    cu, max_length = segments.cu_seq_lens, segments.max_length
    out = varlen_attn(packed(query), packed(key), packed(value), cu, cu, max_length, max_length, **kwargs)
    return out.view(batch, seq_len, heads, head_dim)


_block_masks: tuple[Segments | None, dict] = (None, {})


def _document_block_mask(segments: Segments, causal: bool, sliding_window: int | None):
    """FlexAttention block mask of the segments, built once per forward and mask kind."""
    global _block_masks
    if _block_masks[0] is not segments:
        _block_masks = (segments, {})
    kind = (causal, sliding_window)
    if kind not in _block_masks[1]:
        ids = segments.ids

        def document_mask(b, h, q_idx, kv_idx):
            allowed = ids[b, q_idx] == ids[b, kv_idx]
            if causal:
                allowed = allowed & (kv_idx <= q_idx)
            if sliding_window is not None:
                allowed = allowed & ((q_idx - kv_idx).abs() < sliding_window)
            return allowed

        batch, seq_len = ids.shape
        _block_masks[1][kind] = create_block_mask(
            document_mask, batch, None, seq_len, seq_len, device=ids.device, _compile=True
        )
    return _block_masks[1][kind]


@functools.lru_cache
def _softcap_score_mod(softcap: float):
    """One score_mod per softcap value, so the compiled FlexAttention is not re-traced per call."""

    def softcap_scores(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    return softcap_scores


def _flex_attention(query, key, value, segments, scaling, causal, sliding_window, softcap):
    """Compiled FlexAttention with a document mask: (B, H, S, D) -> (B, S, H, D).

    Softcap is a score_mod s -> c*tanh(s/c); autograd differentiates it (ds = 1 - tanh(s/c)^2).
    """
    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention)

    out = _compiled_flex_attention(
        query,
        key,
        value,
        score_mod=None if softcap is None else _softcap_score_mod(softcap),
        block_mask=_document_block_mask(segments, causal, sliding_window),
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2)


FLEX_MIN_HEAD_DIM = 16  # compiled FlexAttention refuses smaller head dims ("NYI: ... at least 16")


def pick_backend(query: torch.Tensor, *, softcap: float | None, dropout: float, sliding_window: int | None) -> str:
    """The fastest backend that supports these inputs: "varlen", "flex" or "dense"."""
    if not query.is_cuda or dropout > 0:
        return "dense"
    varlen_ok = (
        varlen_attn is not None
        and query.dtype in (torch.float16, torch.bfloat16)
        and softcap is None
        and query.shape[-1] <= 256
        and query.shape[-1] % 8 == 0
        and (sliding_window is None or "window_size" in _VARLEN_PARAMS)
    )
    if varlen_ok:
        return "varlen"
    flex_ok = flex_attention is not None and query.shape[-1] >= FLEX_MIN_HEAD_DIM
    return "flex" if flex_ok else "dense"


def packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segments: Segments,
    *,
    scaling: float,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    dropout: float = 0.0,
    sinks: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Segment-isolated attention of (B, H, S, D) query and (B, H_kv, S, D) key/value -> (B, S, H, D).

    ``backend`` forces "varlen", "flex" or "dense"; by default :func:`pick_backend` chooses.
    Attention ``sinks`` (H,) run on the dense backend.
    """
    if sinks is not None:
        if backend not in (None, "dense"):
            raise ValueError(f"packed_attention: attention sinks run on the dense backend only, not {backend!r}")
        backend = "dense"
    backend = backend or pick_backend(query, softcap=softcap, dropout=dropout, sliding_window=sliding_window)
    if backend == "varlen":
        return _varlen_attention(query, key, value, segments, scaling, causal, sliding_window)
    if backend == "flex":
        return _flex_attention(query, key, value, segments, scaling, causal, sliding_window, softcap)
    allowed = _allowed_mask(
        query.shape[2], key.shape[2], query.device,
        causal=causal, sliding_window=sliding_window, segment_ids=segments.ids, key_valid=None,
    )  # fmt: skip
    return _dense_attention(query, key, value, allowed, scaling, dropout, softcap, sinks)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF attention-interface entry: (B, H, S, D) query, (B, H_kv, S_k, D) key/value -> ((B, S, H, D), None).

    ``attention_mask`` is what :func:`varlen_attention_mask` built: None or a 2D boolean padding
    mask; a 4D mask prepared by the caller is used as is (dense path, no segmenting). ``s_aux``:
    gpt-oss's attention sinks, one logit per head (dense path).
    """
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    q_len, k_len = query.shape[2], key.shape[2]

    if attention_mask is not None and attention_mask.ndim == 4:
        return _dense_attention(query, key, value, attention_mask, scaling, dropout, softcap, s_aux), None

    if q_len != k_len:  # decoding with a KV cache: one segment per row, padding masked out
        key_valid = None if attention_mask is None else attention_mask[:, -k_len:].bool()
        allowed = _allowed_mask(
            q_len, k_len, query.device,
            causal=causal, sliding_window=sliding_window, segment_ids=None, key_valid=key_valid,
        )  # fmt: skip
        return _dense_attention(query, key, value, allowed, scaling, dropout, softcap, s_aux), None

    segments = find_segments(
        query.shape[0],
        q_len,
        query.device,
        cu_seq_lens=kwargs.get("cu_seq_lens_q"),
        max_length=kwargs.get("max_length_q"),
        position_ids=kwargs.get("position_ids"),
        padding_mask=attention_mask,
    )
    out = packed_attention(
        query, key, value, segments,
        scaling=scaling, causal=causal, sliding_window=sliding_window, softcap=softcap, dropout=dropout, sinks=s_aux,
    )  # fmt: skip
    return out, None


def varlen_attention_mask(*, attention_mask: torch.Tensor | None = None, kv_length: int, **kwargs):
    """HF mask-interface entry: no mask is materialised, only a 2D padding mask is passed on (None if no padding)."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    return None if attention_mask.all() else attention_mask


AttentionInterface.register(ATTN_IMPLEMENTATION, varlen_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, varlen_attention_mask)


def use_varlen_attention(model: torch.nn.Module) -> PreTrainedModel:
    """Switch one model instance (possibly wrapped) to ``fastft_varlen`` attention; returns the HF model.

    The model first gets its own copy of its config(s), re-pointed on every submodule, so that
    other models built from the same config object keep their attention implementation.
    """
    hf_model = find_hf_model(model)
    copies: dict[int, PreTrainedConfig] = {}
    copy.deepcopy(hf_model.config, memo=copies)
    for module in hf_model.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, PreTrainedConfig) and id(value) in copies:
                setattr(module, name, copies[id(value)])
    hf_model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if hf_model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise TypeError(f"{type(hf_model).__name__} cannot switch its attention implementation at run time")
    hf_model.__dict__.pop("_fastft_unpacked_attention", None)  # an explicit switch is permanent
    return hf_model


def is_packed_batch(inputs: Mapping[str, Any]) -> bool:
    """Whether a causal LM's forward inputs pack several samples into a row.

    Packed: ``cu_seq_lens_q``/``cu_seq_lens_k`` are given, or ``position_ids`` fail to count up by one
    between neighbouring tokens of a row. With a 2D ``attention_mask`` only pairs of real tokens count,
    so left/right padding (generation, :class:`~lightning_fastft.data.PaddedCollator`) is not packing.
    A mask of any other form (4D, a BlockMask, the per-layer-type dict that generation with a
    static cache passes in transformers 5.17) is the caller's own: such a batch is never packed.
    """
    attention_mask = inputs.get("attention_mask")
    if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
        return False
    if inputs.get("cu_seq_lens_q") is not None or inputs.get("cu_seq_lens_k") is not None:
        return True
    position_ids = inputs.get("position_ids")
    if position_ids is None or position_ids.shape[-1] < 2:
        return False
    restarts = position_ids[..., 1:] != position_ids[..., :-1] + 1
    if attention_mask is not None:
        real = attention_mask[:, -position_ids.shape[-1] :].bool()
        restarts = restarts & real[:, 1:] & real[:, :-1]
    return bool(restarts.any())


def _route_packed_batch(model: PreTrainedModel, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of :func:`route_packed_batches`: picks this forward's attention implementation.

    The choice stays in place until the next forward, so activation-checkpoint recomputation in the
    backward runs the same attention as the forward did.
    """
    inputs = {**dict(zip(inspect.signature(model.forward).parameters, args)), **kwargs} if args else kwargs
    if not is_packed_batch(inputs):
        unpacked_attention = model.__dict__.pop("_fastft_unpacked_attention", None)
        if unpacked_attention is not None and model.config._attn_implementation == ATTN_IMPLEMENTATION:
            model.set_attn_implementation(unpacked_attention)
        return
    name = f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', None)!r})"
    cache = inputs.get("cache", inputs.get("past_key_values"))
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError(
            f"{name} got a packed batch (cu_seq_lens_* or position_ids restarting inside a row) together with "
            "a non-empty KV cache (e.g. prefix tuning): varlen attention cannot keep packed samples apart "
            "while they all attend to the cached keys. Pass unpacked batches."
        )
    implementation = model.config._attn_implementation
    if implementation == ATTN_IMPLEMENTATION:
        return
    if model.config.model_type not in ARCHITECTURES:
        raise ValueError(
            f"{name} got a packed batch (cu_seq_lens_* or position_ids restarting inside a row), and its "
            f"{implementation!r} attention may let the packed samples attend to each other. lightning_fastft "
            f"switches packed batches to its varlen attention only for {', '.join(ARCHITECTURES)}. Pass unpacked "
            "batches (e.g. PaddedCollator), or call lightning_fastft.use_varlen_attention(model) "
            "once you have checked that this architecture hands position_ids/cu_seq_lens_q to its attention function."
        )
    use_varlen_attention(model)
    model._fastft_unpacked_attention = implementation


def route_packed_batches(model: PreTrainedModel) -> None:
    """Give this causal LM instance a forward pre-hook (once) that keeps packed samples apart.

    A packed batch (see :func:`is_packed_batch`) runs ``fastft_varlen`` attention (the model gets its
    own config copy, as with :func:`use_varlen_attention`); the next unpacked batch switches back to
    the model's own attention, so unpacked training, evaluation and generation run unchanged.
    A packed batch raises ``ValueError`` where varlen attention cannot serve it: an architecture
    outside ``ARCHITECTURES`` not switched explicitly, or a non-empty KV cache.
    """
    if _route_packed_batch not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_route_packed_batch, with_kwargs=True)
