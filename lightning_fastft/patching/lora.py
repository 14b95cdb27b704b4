"""PEFT glue: decide which projections the fused LoRA ops can run, and run them.

Works on module instances only (nothing is patched here). :func:`projection_plan` decides
whether one projection is fusable (walking its PEFT state: the slow part) and returns a
:class:`ProjectionPlan` that reads its current tensors cheaply; :func:`projection_plans` does it
for a group (:data:`QKV`, :data:`O_PROJ`, :data:`GLU_MLP`), and ``fused_qkv`` / ``fused_o`` /
``fused_mlp`` run the fused ops from plans. The patched forwards decide once per forward pass.

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

import functools
from dataclasses import dataclass

import torch
from torch import nn

from lightning_fastft.bnb import is_4bit_linear, is_quantized
from lightning_fastft.kernels.lora import LoRAWeights, lora_linear, lora_mlp, lora_qkv

_NO_LORA = (None, None, 0.0)
QKV = ("q_proj", "k_proj", "v_proj")
O_PROJ = ("o_proj",)
GLU_MLP = ("gate_proj", "up_proj", "down_proj")


@functools.cache
def _lora_layer_class():
    from peft.tuners.lora.layer import LoraLayer

    return LoraLayer


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)


def _is_frozen_base(layer: nn.Module) -> bool:
    """A frozen, hook-free nn.Linear or (quantised) bitsandbytes Linear4bit."""
    if _has_hooks(layer):
        return False
    if is_4bit_linear(layer):
        if not is_quantized(layer.weight):  # not quantised yet (still on the CPU)
            return False
    elif type(layer) is not nn.Linear:
        return False
    return not (layer.weight.requires_grad or (layer.bias is not None and layer.bias.requires_grad))


def _is_plain_lora_adapter(module: nn.Module, name: str) -> bool:
    """Whether adapter ``name`` of a PEFT LoRA layer is plain LoRA without dropout or bias."""
    if name in getattr(module, "lora_variant", {}) or module.use_dora.get(name, False):
        return False
    if getattr(module, "lora_bias", {}).get(name, False):
        return False
    dropout = module.lora_dropout[name]
    if not (isinstance(dropout, nn.Identity) or (type(dropout) is nn.Dropout and dropout.p == 0)):
        return False
    layers = (module.lora_A[name], module.lora_B[name])
    return all(type(layer) is nn.Linear and layer.bias is None and not _has_hooks(layer) for layer in layers)


@dataclass(frozen=True)
class ProjectionPlan:
    """Where one fusable projection's weights live: its frozen base layer and, when a plain LoRA
    adapter is active on it, the PEFT layer and the adapter's name. Deciding fusability walks the
    modules; :meth:`weights` only reads the current tensors (cheap, and always fresh)."""

    base_layer: nn.Module
    lora_layer: nn.Module | None = None
    adapter: str | None = None

    def weights(self) -> LoRAWeights:
        base = self.base_layer
        weight = base.weight
        quant_state = getattr(weight, "quant_state", None)
        if self.adapter is None:
            return LoRAWeights(weight, quant_state, base.bias, *_NO_LORA)
        lora, name = self.lora_layer, self.adapter
        return LoRAWeights(
            weight, quant_state, base.bias, lora.lora_A[name].weight, lora.lora_B[name].weight, float(lora.scaling[name])
        )


def projection_plan(module: nn.Module) -> ProjectionPlan | None:
    """The :class:`ProjectionPlan` of a projection, or ``None`` when it is not fusable (see the
    module docstring)."""
    if not isinstance(module, _lora_layer_class()):
        return ProjectionPlan(module) if _is_frozen_base(module) else None
    if _has_hooks(module) or getattr(module, "fan_in_fan_out", False) or module.merged:
        return None
    base = module.get_base_layer()
    if not _is_frozen_base(base):
        return None
    if module.disable_adapters:
        return ProjectionPlan(base)
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) > 1:
        return None
    if not active:
        return ProjectionPlan(base)
    return ProjectionPlan(base, module, active[0]) if _is_plain_lora_adapter(module, active[0]) else None


def projection_plans(parent: nn.Module, names: tuple[str, ...]) -> tuple[ProjectionPlan, ...] | None:
    """Plans of ``parent``'s projections ``names`` (e.g. :data:`QKV`), or None unless all are fusable."""
    plans = []
    for name in names:
        module = getattr(parent, name, None)
        plan = projection_plan(module) if isinstance(module, nn.Module) else None
        if plan is None:
            return None
        plans.append(plan)
    return tuple(plans)


def fused_qkv(plans: tuple[ProjectionPlan, ...], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q_proj(x), k_proj(x), v_proj(x))``, each shaped ``(*x.shape[:-1], out)``, as one fused LoRA op."""
    return lora_qkv(x, *(plan.weights() for plan in plans))


def fused_o(plans: tuple[ProjectionPlan, ...], x: torch.Tensor) -> torch.Tensor:
    """``o_proj(x)`` as one fused LoRA op."""
    return lora_linear(x, plans[0].weights())


def fused_mlp(
    plans: tuple[ProjectionPlan, ...], x: torch.Tensor, activation: str, output_unused: bool = False
) -> torch.Tensor:
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` as one fused LoRA op (``activation``: one of
    the GLU kernel's ``ACTIVATIONS``; ``output_unused``: see :func:`lora_mlp`)."""
    return lora_mlp(x, *(plan.weights() for plan in plans), activation, output_unused=output_unused)
