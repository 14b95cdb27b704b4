"""What lightning_fastft knows about bitsandbytes 4-bit layers, in one place: recognising them,
their logical size, dequantising them, and quantising a model's linear layers.

bitsandbytes is imported on first use (its import is slow and prints notices), never at import of
this module. The kernel that dequantises inside the fused LoRA ops reads the same ``QuantState``
(:mod:`lightning_fastft.kernels.nf4`). bitsandbytes 0.50 quantises 4-bit on CPU as well as CUDA:
a weight is quantised on the device it already lives on.
"""

from __future__ import annotations

import copy
import functools
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

BLOCKSIZE = 64
"""Elements per 4-bit quantisation block (the bitsandbytes default)."""


@functools.cache
def bitsandbytes() -> Any:
    """The ``bitsandbytes`` module (a hard dependency), imported once on first use."""
    import bitsandbytes as bnb

    return bnb


def is_4bit_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a ``bitsandbytes.nn.Linear4bit``. Without bitsandbytes imported there is
    none, and asking does not import it (slow, and it prints notices on machines without its kernels)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_quantized(param: torch.Tensor) -> bool:
    """Whether ``param`` holds a quantised 4-bit weight (a ``Params4bit`` with its ``QuantState``;
    a ``Params4bit`` not yet moved to a device is still dense)."""
    return getattr(param, "quant_state", None) is not None


def logical_numel(param: torch.Tensor) -> int:
    """Number of weights ``param`` stands for: its ``numel()``, or for a quantised 4-bit parameter
    (packed two per byte) the numel of the weight its ``QuantState`` describes."""
    return param.quant_state.shape.numel() if is_quantized(param) else param.numel()


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The dense weight of a quantised ``Linear4bit`` layer, in its quantisation dtype."""
    weight, quant_state = layer.weight.data, layer.weight.quant_state
    if getattr(quant_state, "packing_format_for_cpu", False):
        # bitsandbytes repacks CPU 4-bit weights in place for inference (AVX512-BF16);
        # undo that on a copy of the state so the caller's layer is left as it is.
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight, quant_state = _convert_weight_packed_for_cpu_inverse(weight, copy.deepcopy(quant_state))
    return bitsandbytes().functional.dequantize_4bit(weight, quant_state)


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """``layer``'s weight as a dense tensor: dequantised for a 4-bit layer, else its own (detached)."""
    return dequantized_weight(layer) if is_4bit_linear(layer) else layer.weight.detach()


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
    bnb = bitsandbytes()
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not set(name.split(".")) & set(skip_modules)
    ]
    cpu_misaligned = [
        name for name, linear in targets if linear.weight.device.type == "cpu" and linear.in_features % BLOCKSIZE
    ]
    if cpu_misaligned:
        # bitsandbytes' CPU 4-bit kernels dequantise block-per-row while quantisation blocks
        # run over the flattened weight: rows not a multiple of the block come back wrong.
        warnings.warn(
            f"lightning_fastft: leaving {len(cpu_misaligned)} linear layer(s) unquantised on CPU because "
            f"in_features is not a multiple of {BLOCKSIZE} (e.g. {cpu_misaligned[0]})",
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
            blocksize=BLOCKSIZE,
            module=quantized,
        ).to(linear.weight.device)  # Params4bit quantises on its first move to a device
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, quantized)
    return [name for name, _ in targets]
