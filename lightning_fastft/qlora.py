"""QLoRA set-up: a frozen bitsandbytes 4-bit base with trainable PEFT LoRA adapters.

``prepare_qlora`` quantises an already-loaded Hugging Face causal LM in place (its
``nn.Linear`` children become ``bnb.nn.Linear4bit``); ``load_qlora`` lets transformers
quantise while loading from a local directory (or a hub name, when the caller allows it).
Both end in the same step: freeze the base and attach LoRA with PEFT.

bitsandbytes 0.50 quantises 4-bit on CPU as well as CUDA: the weight is quantised on the
device it already lives on.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import bitsandbytes as bnb
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

_BLOCKSIZE = 64  # elements per 4-bit quantisation block (the bitsandbytes default)


def quantize_linear_layers(
    model: nn.Module,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    skip_modules: Sequence[str] = ("lm_head",),
) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a frozen ``bnb.nn.Linear4bit``.

    A layer is skipped when any dotted component of its name is in ``skip_modules``, and on
    CPU when ``in_features`` is not a multiple of 64 (bitsandbytes' CPU kernels get those wrong). The
    weight is cast to ``compute_dtype`` and quantised on its current device (dequantising
    gives back ``compute_dtype``); the bias is kept in ``compute_dtype``.
    Returns the names of the quantised layers.
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not set(name.split(".")) & set(skip_modules)
    ]
    cpu_misaligned = [
        name for name, linear in targets if linear.weight.device.type == "cpu" and linear.in_features % _BLOCKSIZE
    ]
    if cpu_misaligned:
        # bitsandbytes' CPU 4-bit kernels dequantise block-per-row while quantisation blocks
        # run over the flattened weight: rows not a multiple of the block come back wrong.
        warnings.warn(
            f"lightning_fastft: leaving {len(cpu_misaligned)} linear layer(s) unquantised on CPU because "
            f"in_features is not a multiple of {_BLOCKSIZE} (e.g. {cpu_misaligned[0]})",
            stacklevel=2,
        )
        targets = [(name, linear) for name, linear in targets if name not in cpu_misaligned]
    for name, linear in targets:
        if linear.weight.device.type == "meta":
            raise ValueError(f"{name} has no weights (meta device); load the model before quantising it")
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type=quant_type,
            device="meta",
        )
        quantized.weight = bnb.nn.Params4bit(
            linear.weight.data.to(compute_dtype),
            requires_grad=False,
            compress_statistics=double_quant,
            quant_type=quant_type,
            blocksize=_BLOCKSIZE,
            module=quantized,
        ).to(linear.weight.device)  # Params4bit quantises on its first move to a device
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, quantized)
    return [name for name, _ in targets]


def attach_lora(
    model: nn.Module,
    *,
    lora_r: int = 16,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: str | Sequence[str] = "all-linear",
) -> PeftModel:
    """Freeze every base parameter and wrap ``model`` with trainable LoRA adapters."""
    model.requires_grad_(False)
    config = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def prepare_qlora(
    model: nn.Module,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    lora_r: int = 16,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: str | Sequence[str] = "all-linear",
    skip_modules: Sequence[str] = ("lm_head",),
) -> PeftModel:
    """Quantise a loaded causal LM's linear layers to 4-bit, freeze it and attach LoRA.

    Mutates ``model``: its linear layers are replaced and its remaining floating-point
    parameters (embeddings, norms, skipped layers) are cast to ``compute_dtype``.
    """
    quantize_linear_layers(
        model,
        quant_type=quant_type,
        double_quant=double_quant,
        compute_dtype=compute_dtype,
        skip_modules=skip_modules,
    )
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(compute_dtype)
    # PEFT reads this flag to wrap Linear4bit layers with its 4-bit-aware LoRA layer.
    model.is_loaded_in_4bit = True
    return attach_lora(
        model,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
    )


def load_qlora(
    path_or_name: str,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    lora_r: int = 16,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: str | Sequence[str] = "all-linear",
    skip_modules: Sequence[str] = ("lm_head",),
    **from_pretrained_kwargs,
) -> PeftModel:
    """Load a causal LM quantised to 4-bit by transformers' ``BitsAndBytesConfig``; attach LoRA.

    Extra keyword arguments go to ``AutoModelForCausalLM.from_pretrained`` (for example
    ``device_map`` or ``local_files_only``).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(skip_modules),
    )
    from_pretrained_kwargs.setdefault("dtype", compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(
        path_or_name, quantization_config=quantization_config, **from_pretrained_kwargs
    )
    return attach_lora(
        model,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
    )
