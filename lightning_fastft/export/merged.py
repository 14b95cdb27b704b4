"""Merge LoRA adapters into 16-bit base weights and save a plain Hugging Face checkpoint.

For every LoRA-wrapped linear layer the merged weight is ``W + scaling * B @ A`` (transposed
for ``fan_in_fan_out`` layers), with ``W`` dequantised first when the base is a bitsandbytes
4-bit layer. Everything is computed from the caller's model without touching it: LoRA
layers stay unmerged and 4-bit weights stay quantised.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import torch
from torch import nn

from lightning_fastft._hf import unwrap_peft
from lightning_fastft.bnb import dense_weight, dequantized_weight, is_4bit_linear

def _merged_lora_linear(lora_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a PEFT LoRA linear layer with its active, unmerged adapters added in fp32."""
    base = lora_layer.get_base_layer()
    weight = dense_weight(base).float()
    bias = None if base.bias is None else base.bias.detach().float()
    for adapter in lora_layer.active_adapters:
        if adapter not in lora_layer.lora_A or adapter in lora_layer.merged_adapters:
            continue
        if lora_layer.use_dora.get(adapter, False):
            raise NotImplementedError("merge_and_save does not support DoRA adapters")
        lora_a, lora_b = lora_layer.lora_A[adapter], lora_layer.lora_B[adapter]
        if not isinstance(lora_a, nn.Linear):
            raise NotImplementedError(f"cannot merge LoRA adapter of type {type(lora_a).__name__}")
        scaling = lora_layer.scaling[adapter]
        delta = (lora_b.weight.float() @ lora_a.weight.float()) * scaling
        weight = weight + (delta.T if lora_layer.fan_in_fan_out else delta)
        if lora_b.bias is not None:
            bias = (0 if bias is None else bias) + lora_b.bias.detach().float() * scaling
    return weight, bias


def _collect(module: nn.Module, prefix: str, out: dict[str, torch.Tensor]) -> None:
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    if isinstance(module, LoraLayer):
        weight, bias = _merged_lora_linear(module)
        out[prefix + "weight"] = weight
        if bias is not None:
            out[prefix + "bias"] = bias
        return
    if isinstance(module, ModulesToSaveWrapper):
        adapter = module.active_adapter
        trained = module.modules_to_save[adapter] if adapter in module.modules_to_save else module.original_module
        _collect(trained, prefix, out)
        return
    if is_4bit_linear(module):
        out[prefix + "weight"] = dequantized_weight(module)
        if module.bias is not None:
            out[prefix + "bias"] = module.bias.detach()
        return
    for name, param in module._parameters.items():
        if param is not None:
            out[prefix + name] = param.detach()
    for name, buffer in module._buffers.items():
        if buffer is not None and name not in module._non_persistent_buffers_set:
            out[prefix + name] = buffer
    for name, child in module._modules.items():
        if child is not None:
            _collect(child, f"{prefix}{name}.", out)


def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """State dict of the plain model with LoRA merged and 4-bit weights dequantised.

    Keys are those of the un-wrapped transformers model. Floating tensors are cast to
    ``dtype`` when given. Tensors that need no change may share storage with ``model``.
    """
    state: dict[str, torch.Tensor] = {}
    _collect(unwrap_peft(model), "", state)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


def merged_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A plain transformers model (same class as the base) holding the merged weights.

    The caller's model is not modified; unchanged tensors (embeddings, norms, non-LoRA
    weights already in ``dtype``) are shared with it, so treat the result as read-only.
    """
    base = unwrap_peft(model)
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    with torch.device("meta"):
        plain = type(base)(config)
    missing, unexpected = plain.load_state_dict(merged_state_dict(model, dtype), strict=False, assign=True)
    if unexpected:
        raise RuntimeError(f"merged weights not in {type(base).__name__}: {unexpected}")
    plain.tie_weights()
    source_buffers = dict(base.named_buffers())
    for name, buffer in plain.named_buffers():
        if buffer.is_meta:  # non-persistent buffers (rotary inv_freq, ...) come from the source
            module_name, _, leaf = name.rpartition(".")
            plain.get_submodule(module_name)._buffers[leaf] = source_buffers[name].clone()
    still_missing = [name for name, param in plain.named_parameters() if param.is_meta]
    if still_missing:
        raise RuntimeError(f"merged weights lack {still_missing} (unmatched keys: {missing})")
    plain.generation_config = copy.deepcopy(base.generation_config)
    return plain.eval()


def merge_and_save(
    model: nn.Module,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer=None,
    safe_serialization: bool = True,
) -> nn.Module:
    """Merge ``model``'s LoRA adapters into its (dequantised) base and save a plain checkpoint.

    Writes config, weights (safetensors) and, when given, the tokenizer to ``out_dir`` so
    that ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads the merged model. The
    caller's model is not modified. Returns the merged model.
    """
    if Path(out_dir).is_file():  # save_pretrained would log an error and save nothing
        raise NotADirectoryError(f"merge_and_save: out_dir {str(out_dir)!r} is a file, not a directory")
    plain = merged_model(model, dtype)
    save_kwargs = {}
    if "safe_serialization" in inspect.signature(plain.save_pretrained).parameters:
        save_kwargs["safe_serialization"] = safe_serialization
    elif not safe_serialization:
        raise ValueError("this transformers version saves safetensors only; use safe_serialization=True")
    plain.save_pretrained(out_dir, **save_kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return plain
