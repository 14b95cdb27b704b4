"""Export a Hugging Face causal LM (plain, LoRA, or 4-bit QLoRA) to a GGUF file for llama.cpp.

Follows the conventions of llama.cpp's ``convert_hf_to_gguf.py`` for the supported families:

* llama / mistral (gguf arch ``llama``): llama.cpp rotates interleaved pairs ``(2i, 2i+1)``
  while HF rotates halves ``(i, i + d/2)``, so the rows of every head of ``q_proj`` (with
  ``num_attention_heads``) and ``k_proj`` (with ``num_key_value_heads``) are permuted with
  :func:`permute_rotary_halves`.
* qwen2 / qwen3 / gemma / gemma2 use NeoX-style (halves) rope in llama.cpp: no permutation.
* gemma / gemma2 RMSNorm scales by ``1 + w``; llama.cpp uses plain ``w``, so ``1`` is added to
  every ``*norm.weight``. Their ``lm_head`` is tied to the embeddings and not written.
* 1-D tensors (norms, biases) are stored as F32; 2-D tensors in the requested type, with
  Q8_0 falling back to F16 (with a warning naming them) for rows not a multiple of the 32-wide block;
  the k-quant mixtures (q4_k_m, q5_k_m, q6_k) pick each tensor's type as llama.cpp's quantiser
  does (:mod:`lightning_fastft.export.quants`).
* The tokenizer is written as the llama.cpp tokenizer family that tokenises like it
  (:mod:`lightning_fastft.export.gguf_tokenizer`).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from lightning_fastft._hf import unwrap_peft
from lightning_fastft.architectures import ARCHITECTURES, ArchitectureSpec, head_dim
from lightning_fastft.export.gguf_tokenizer import GGUFWriter, check_tokenizer, write_tokenizer
from lightning_fastft.export.merged import merged_state_dict
from lightning_fastft.export.modelfile import modelfile_text
from lightning_fastft.export.quants import K_QUANTS, MIXTURES, mixture_type, quantize_k

_OUTPUT_TYPES = {
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    **MIXTURES,
}

_Q8_0_BLOCK = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]  # Q8_0 quantises rows in blocks this wide


def permute_rotary_halves(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from HF rotate-half pairing to llama.cpp's interleaved pairing.

    Row ``j < d/2`` of a head goes to ``2j`` and row ``d/2 + j`` to ``2j + 1``. Works on
    weights ``[n_heads * d, in]`` and biases ``[n_heads * d]``.
    """
    head_dim = weight.shape[0] // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def _rope_scaling(config) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params)


def _llama3_rope_factors(config) -> torch.Tensor:
    """Per-frequency divisors llama.cpp applies for llama3 rope scaling (``rope_freqs.weight``)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    width = head_dim(config)
    base_inv_freq = 1.0 / (_rope_theta(config) ** (torch.arange(0, width, 2, dtype=torch.float32) / width))
    scaled_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return base_inv_freq / scaled_inv_freq.float()


def _write_hyperparameters(writer: gguf.GGUFWriter, config, spec: ArchitectureSpec, file_type) -> None:
    head_width = head_dim(config)
    writer.add_name(Path(getattr(config, "name_or_path", "") or "model").name or "model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_width)
    writer.add_key_length(head_width)
    writer.add_value_length(head_width)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    scaling = _rope_scaling(config)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif rope_type not in ("default", "llama3"):  # llama3 is carried by the rope_freqs tensor
        raise NotImplementedError(f"GGUF export does not handle rope scaling {rope_type!r}")
    if spec.gguf_arch == "GEMMA2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)


def _load(model_or_dir, tokenizer):
    if not isinstance(model_or_dir, (str, os.PathLike)):
        return model_or_dir, tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_or_dir, dtype="auto")
    directory = Path(model_or_dir)
    has_tokenizer = any((directory / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))
    if tokenizer is None and has_tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    return model, tokenizer


def _tensor_type(dtype: str, gguf_name: str, array_shape, n_layers: int, tied: bool):
    """The stored type of one tensor: F32 for 1-D tensors and norms, else the file type's choice
    (``q8_0`` rows not a multiple of its block stay F16; the k-quant mixtures follow llama.cpp)."""
    if len(array_shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    if dtype in MIXTURES:
        layer = re.match(r"blk\.(\d+)\.", gguf_name)
        return mixture_type(dtype, gguf_name, array_shape[-1], layer and int(layer[1]), n_layers, tied)
    qtype = _OUTPUT_TYPES[dtype][0]
    if qtype == gguf.GGMLQuantizationType.Q8_0 and array_shape[-1] % _Q8_0_BLOCK:
        return gguf.GGMLQuantizationType.F16
    return qtype


def _quantize(data: torch.Tensor, qtype) -> np.ndarray:
    if qtype in K_QUANTS:
        return quantize_k(data, qtype)
    return gguf.quants.quantize(data.numpy(), qtype)


def export_gguf(
    model_or_dir: nn.Module | str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    dtype: str = "f16",
    tokenizer=None,
    overwrite: bool = False,
    modelfile: bool = False,
) -> Path:
    """Write ``model_or_dir`` as a GGUF file; returns its path.

    ``dtype``: ``"f16"``, ``"bf16"``, ``"q8_0"``, or the k-quant mixtures ``"q4_k_m"``,
    ``"q5_k_m"``, ``"q6_k"`` (quantised here, tensor types chosen as llama.cpp's quantiser does).
    ``model_or_dir`` is a transformers causal LM (a PEFT LoRA / QLoRA model is merged on the
    fly, without modifying it) or a directory saved by ``save_pretrained`` (its tokenizer is
    picked up when present). ``tokenizer``: a HF fast tokenizer (see
    :mod:`lightning_fastft.export.gguf_tokenizer` for the families llama.cpp runs). With
    ``modelfile=True`` an Ollama ``Modelfile`` is written beside the file (see
    :mod:`lightning_fastft.export.modelfile`). Existing outputs are replaced only with
    ``overwrite=True``; an unsupported architecture or tokenizer fails before anything is written.
    """
    if dtype not in _OUTPUT_TYPES:
        raise ValueError(f"dtype must be one of {sorted(_OUTPUT_TYPES)}, got {dtype!r}")
    out_path = Path(out_path)
    modelfile_path = out_path.parent / "Modelfile"
    for path in (out_path, modelfile_path) if modelfile else (out_path,):
        if path.is_dir():
            raise IsADirectoryError(f"export_gguf: {str(path)!r} is a directory, not a file")
        if path.exists() and not overwrite:
            raise FileExistsError(f"export_gguf: {str(path)!r} already exists; pass overwrite=True to replace it")
    model, tokenizer = _load(model_or_dir, tokenizer)
    config = unwrap_peft(model).config
    if config.model_type not in ARCHITECTURES:
        raise NotImplementedError(f"GGUF export supports {sorted(ARCHITECTURES)}, not model_type={config.model_type!r}")
    if ARCHITECTURES[config.model_type].gguf_arch is None:
        raise NotImplementedError(f"GGUF export does not support model_type={config.model_type!r} (mixture of experts)")
    if tokenizer is not None:
        check_tokenizer(tokenizer, config.vocab_size)
    generation_config = getattr(unwrap_peft(model), "generation_config", None)
    modelfile_content = modelfile_text(out_path.name, tokenizer, generation_config) if modelfile else None
    spec = ARCHITECTURES[config.model_type]
    arch = gguf.MODEL_ARCH[spec.gguf_arch]
    file_type = _OUTPUT_TYPES[dtype][1]
    tied = spec.tied_lm_head or bool(getattr(config, "tie_word_embeddings", False))
    n_heads = config.num_attention_heads
    n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(out_path, gguf.MODEL_ARCH_NAMES[arch], use_temp_file=True)
    _write_hyperparameters(writer, config, spec, file_type)
    if tokenizer is not None:
        write_tokenizer(writer, tokenizer, config.vocab_size)

    if _rope_scaling(config).get("rope_type") == "llama3":
        rope_freqs_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        writer.add_tensor(rope_freqs_name, _llama3_rope_factors(config).numpy())
    q8_0_count, f16_fallbacks, k_fallbacks = 0, [], []
    for hf_name, tensor in merged_state_dict(model).items():
        if hf_name == "lm_head.weight" and tied:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise NotImplementedError(f"no GGUF name for tensor {hf_name!r} of {config.model_type}")
        data = tensor.detach().float().cpu()
        if spec.gguf_permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_rotary_halves(data, n_heads)
        elif spec.gguf_permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute_rotary_halves(data, n_kv_heads)
        if spec.norm_offset and hf_name.endswith("norm.weight"):
            data = data + spec.norm_offset
        qtype = _tensor_type(dtype, gguf_name, tuple(data.shape), config.num_hidden_layers, tied)
        if dtype == "q8_0" and qtype == gguf.GGMLQuantizationType.F16:
            f16_fallbacks.append(f"{gguf_name} (rows of {data.shape[-1]})")
        q8_0_count += qtype == gguf.GGMLQuantizationType.Q8_0
        if dtype in MIXTURES and qtype not in K_QUANTS and qtype != gguf.GGMLQuantizationType.F32:
            k_fallbacks.append(f"{gguf_name} -> {qtype.name} (rows of {data.shape[-1]})")
        writer.add_tensor(gguf_name, _quantize(data, qtype), raw_dtype=qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if modelfile_content is not None:
        modelfile_path.write_text(modelfile_content, encoding="utf-8")
    if f16_fallbacks:
        if q8_0_count == 0:
            stay = f"none of the {len(f16_fallbacks)} weight matrices is Q8_0, the file is effectively f16"
        else:
            stay = f"{len(f16_fallbacks)} of {len(f16_fallbacks) + q8_0_count} weight matrices stay F16"
        warnings.warn(
            f"export_gguf(dtype='q8_0'): {stay}, their rows not being a multiple of the {_Q8_0_BLOCK}-wide "
            f"Q8_0 block: {', '.join(f16_fallbacks)}",
            stacklevel=2,
        )
    if k_fallbacks:
        warnings.warn(
            f"export_gguf(dtype={dtype!r}): rows not a multiple of the 256-wide k-quant block fall back as in "
            f"llama.cpp: {', '.join(k_fallbacks)}",
            stacklevel=2,
        )
    return out_path
