"""LoRA and QLoRA set-up: trainable PEFT LoRA adapters on a frozen base, optionally quantised to
bitsandbytes 4-bit.

The settings are declared once, as :class:`LoraSettings` and :class:`QuantSettings`, and taken as
keyword arguments by :func:`attach_lora`, :func:`prepare_qlora` (quantises an already-loaded
model in place: its ``nn.Linear`` children become ``bnb.nn.Linear4bit``), :func:`load_qlora`
(transformers quantises while loading) and :class:`~lightning_fastft.module.CausalLMFineTune`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
from torch import nn

from lightning_fastft._settings import pop_fields, takes_fields
from lightning_fastft.bnb import quantize_linear_layers

QuantType = Literal["nf4", "fp4"]


@dataclass(frozen=True)
class LoraSettings:
    """PEFT LoRA adapters: rank, scale ``lora_alpha / lora_r``, dropout, targeted modules (PEFT's
    ``"all-linear"``: every linear layer but the LM head)."""

    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: Union[str, Sequence[str]] = "all-linear"

    def __post_init__(self) -> None:
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise ValueError(f"lora_r must be a positive int, got {self.lora_r!r}")

    def peft_config(self) -> Any:
        from peft import LoraConfig

        targets = self.target_modules
        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=targets if isinstance(targets, str) else list(targets),
            bias="none",
            task_type="CAUSAL_LM",
        )


@dataclass(frozen=True)
class QuantSettings:
    """bitsandbytes 4-bit quantisation of the frozen base's linear layers."""

    quant_type: QuantType = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    skip_modules: Sequence[str] = ("lm_head",)

    def __post_init__(self) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")


def _no_other_options(function: str, options: dict[str, Any]) -> None:
    if options:
        raise TypeError(f"{function}() got unexpected keyword arguments {sorted(options)}")


@takes_fields(LoraSettings)
def attach_lora(model: nn.Module, **options: Any) -> Any:
    """Freeze every base parameter and wrap ``model`` with trainable LoRA adapters
    (:class:`LoraSettings` as keywords); returns the ``PeftModel``. On a mixture-of-experts model
    ``"all-linear"`` also targets the stacked expert weights and leaves the routers frozen
    (:func:`~lightning_fastft.patching.moe.moe_lora_targets`)."""
    from peft import get_peft_model

    from lightning_fastft.patching.moe import moe_lora_targets

    lora = pop_fields(LoraSettings, options)
    _no_other_options("attach_lora", options)
    model.requires_grad_(False)
    config = lora.peft_config()
    moe_targets = moe_lora_targets(model) if lora.target_modules == "all-linear" else None
    if moe_targets is not None:  # mixture of experts: the stacked experts too, never the routers
        config = dataclasses.replace(config, target_modules=moe_targets[0], target_parameters=moe_targets[1])
    return get_peft_model(model, config)


@takes_fields(QuantSettings, LoraSettings)
def prepare_qlora(model: nn.Module, **options: Any) -> Any:
    """Quantise a loaded causal LM's linear layers to 4-bit, freeze it and attach LoRA
    (:class:`QuantSettings` and :class:`LoraSettings` as keywords).

    Mutates ``model``: its linear layers are replaced and its remaining floating-point
    parameters (embeddings, norms, skipped layers) are cast to ``compute_dtype``.
    """
    quant = pop_fields(QuantSettings, options)
    lora = pop_fields(LoraSettings, options)
    _no_other_options("prepare_qlora", options)
    quantize_linear_layers(
        model,
        quant_type=quant.quant_type,
        double_quant=quant.double_quant,
        compute_dtype=quant.compute_dtype,
        skip_modules=quant.skip_modules,
    )
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(quant.compute_dtype)
    # PEFT reads this flag to wrap Linear4bit layers with its 4-bit-aware LoRA layer.
    model.is_loaded_in_4bit = True
    return attach_lora(model, **dataclasses.asdict(lora))


@takes_fields(QuantSettings, LoraSettings)
def load_qlora(path_or_name: str, **from_pretrained_kwargs: Any) -> Any:
    """Load a causal LM quantised to 4-bit by transformers' ``BitsAndBytesConfig``; attach LoRA.

    :class:`QuantSettings` and :class:`LoraSettings` as keywords; the other keyword arguments go to
    ``AutoModelForCausalLM.from_pretrained`` (for example ``device_map`` or ``local_files_only``).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = pop_fields(QuantSettings, from_pretrained_kwargs)
    lora = pop_fields(LoraSettings, from_pretrained_kwargs)
    quantization_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=quant.compute_dtype,
        llm_int8_skip_modules=list(quant.skip_modules),
    )
    from_pretrained_kwargs.setdefault("dtype", quant.compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(
        path_or_name, quantization_config=quantization_config, **from_pretrained_kwargs
    )
    return attach_lora(model, **dataclasses.asdict(lora))
