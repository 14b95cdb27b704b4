"""PEFT glue: read a LoRA projection's weights and build fused MLP / QKV / O callables.

Works on module instances only (nothing is patched here): :func:`lora_weights` reads one
projection, the ``make_fused_*`` factories return callables for the patched forwards to call.

A projection is fusable when it is

* a PEFT LoRA layer (``peft.tuners.lora.layer.Linear`` or its bitsandbytes ``Linear4bit``
  counterpart) over a frozen ``nn.Linear`` / ``bitsandbytes.nn.Linear4bit`` (frozen bias or
  none), with at most one active adapter on it, not merged, plain LoRA (no DoRA or other
  variant, no LoRA bias), dropout ``Identity`` or ``p == 0``, no ``fan_in_fan_out``; or
* a plain frozen ``nn.Linear`` / ``Linear4bit`` (a projection LoRA does not target, e.g. k_proj
  when only q_proj and v_proj carry adapters), or a LoRA layer whose adapters are disabled or
  not active on it: then :class:`LoRAWeights` has ``lora_A = lora_B = None`` and the fused op
  computes the base projection only, exactly as PEFT does;

and neither it nor its base layer has forward hooks or an instance-level ``forward``.
Anything else gives ``None``: leave PEFT's own forward.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..kernels.glu import ACTIVATIONS, glu
from ..kernels.lora import LoRAWeights, lora_linear, lora_mlp, lora_qkv

_NO_LORA = (None, None, 0.0)


def _linear4bit_class():
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb.nn.Linear4bit


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)


def _frozen_base(layer: nn.Module) -> tuple | None:
    """``(base, quant_state, bias)`` of a frozen nn.Linear / Linear4bit, else None."""
    if _has_hooks(layer):
        return None
    linear4bit = _linear4bit_class()
    if linear4bit is not None and isinstance(layer, linear4bit):
        quant_state = getattr(layer.weight, "quant_state", None)
        if quant_state is None:  # not quantised yet (still on the CPU before .to(device))
            return None
    elif type(layer) is nn.Linear:
        quant_state = None
    else:
        return None
    if layer.weight.requires_grad or (layer.bias is not None and layer.bias.requires_grad):
        return None
    return layer.weight, quant_state, layer.bias


def _plain_lora_adapter(module: nn.Module, name: str) -> tuple | None:
    """``(lora_A, lora_B, scaling)`` of adapter ``name`` when it is plain LoRA, else None."""
    if name in getattr(module, "lora_variant", {}) or module.use_dora.get(name, False):
        return None
    if getattr(module, "lora_bias", {}).get(name, False):
        return None
    dropout = module.lora_dropout[name]
    if not (isinstance(dropout, nn.Identity) or (type(dropout) is nn.Dropout and dropout.p == 0)):
        return None
    lora_A, lora_B = module.lora_A[name], module.lora_B[name]
    for layer in (lora_A, lora_B):
        if type(layer) is not nn.Linear or layer.bias is not None or _has_hooks(layer):
            return None
    return lora_A.weight, lora_B.weight, float(module.scaling[name])


def lora_weights(module: nn.Module) -> LoRAWeights | None:
    """The projection's :class:`LoRAWeights`, read now (current parameters and scaling), or
    ``None`` when it is not fusable (see the module docstring)."""
    from peft.tuners.lora.layer import LoraLayer

    if not isinstance(module, LoraLayer):
        base = _frozen_base(module)
        return None if base is None else LoRAWeights(*base, *_NO_LORA)
    if _has_hooks(module) or getattr(module, "fan_in_fan_out", False):
        return None
    base = _frozen_base(module.get_base_layer())
    if base is None or module.merged:
        return None
    if module.disable_adapters:
        return LoRAWeights(*base, *_NO_LORA)
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) > 1:
        return None
    if not active:
        return LoRAWeights(*base, *_NO_LORA)
    adapter = _plain_lora_adapter(module, active[0])
    return None if adapter is None else LoRAWeights(*base, *adapter)


def _all_weights(modules: list[nn.Module]) -> list[LoRAWeights] | None:
    weights = [lora_weights(m) for m in modules]
    return None if any(w is None for w in weights) else weights


def _projections(parent: nn.Module, names: tuple[str, ...]) -> list[nn.Module] | None:
    modules = [getattr(parent, name, None) for name in names]
    if any(not isinstance(m, nn.Module) for m in modules) or _all_weights(modules) is None:
        return None
    return modules


def make_fused_mlp(mlp_module: nn.Module, activation: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``x -> down_proj(act(gate_proj(x)) * up_proj(x))`` as one fused LoRA op, for HF GLU MLPs
    (``activation``: one of the GLU kernel's ``ACTIVATIONS``), or None when not fusable. The
    callable reads the weights at each call and falls back to the modules' own forwards if they
    stopped being fusable (e.g. adapters merged meanwhile)."""
    if activation not in ACTIVATIONS:
        return None
    modules = _projections(mlp_module, ("gate_proj", "up_proj", "down_proj"))
    if modules is None:
        return None
    gate_proj, up_proj, down_proj = modules

    def fused_mlp(x: torch.Tensor) -> torch.Tensor:
        weights = _all_weights(modules)
        if weights is None:
            return down_proj(glu(gate_proj(x), up_proj(x), activation))
        return lora_mlp(x, *weights, activation)

    return fused_mlp


def make_fused_qkv(attn_module: nn.Module) -> Callable[[torch.Tensor], tuple] | None:
    """``x -> (q_proj(x), k_proj(x), v_proj(x))`` (each shaped ``(*x.shape[:-1], out)``) as one
    fused LoRA op, or None when not fusable; weights read at each call, as in make_fused_mlp."""
    modules = _projections(attn_module, ("q_proj", "k_proj", "v_proj"))
    if modules is None:
        return None

    def fused_qkv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weights = _all_weights(modules)
        if weights is None:
            return tuple(m(x) for m in modules)
        return lora_qkv(x, *weights)

    return fused_qkv


def make_fused_o(attn_module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``x -> o_proj(x)`` as a fused LoRA op, or None when not fusable; weights read at each call."""
    modules = _projections(attn_module, ("o_proj",))
    if modules is None:
        return None
    (o_proj,) = modules

    def fused_o(x: torch.Tensor) -> torch.Tensor:
        weights = _all_weights(modules)
        if weights is None:
            return o_proj(x)
        return lora_linear(x, weights[0])

    return fused_o
