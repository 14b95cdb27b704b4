"""Patch the sparse mixture-of-experts blocks (Qwen3-MoE, Qwen2-MoE, Mixtral, gpt-oss) to run
every routed expert as grouped GEMMs (:func:`lightning_fastft.kernels.moe.moe_experts`).

The block's own router module is still called, so routing is exactly the architecture's (top-k,
softmax before or after selection, ``norm_topk_prob``, gpt-oss's biased router) and Hugging
Face's output recorder still collects its router logits for the load-balancing loss. Only the
experts' loop is replaced; the Qwen2-MoE shared expert (a dense MLP, patched as one) keeps its
sigmoid gate. gpt-oss's experts (``MoeSpec.expert_layout == "interleaved"``) run with their biases
inside the grouped GEMMs, their (E, in, out) weights read in place and their interleaved gate/up
columns gated by the clamped SwiGLU kernel (:mod:`lightning_fastft.kernels.clamped_swiglu`) with
the experts' own ``alpha`` and ``limit``; the block returns ``(output, routing weights)`` as
``GptOssMLP`` does.

LoRA on the experts is PEFT's ``target_parameters`` (``ParamWrapper`` around the experts module,
one per targeted 3-D parameter, nested): its factors are read at every call and fused into the
grouped GEMMs instead of PEFT materialising ``W + B A`` for every expert. Any PEFT state the
fused path does not cover (several active adapters, merged, another parameter targeted) calls
the experts module as it stands, which is PEFT's forward.

A block that departs from the layout its architecture's :class:`~lightning_fastft.architectures.MoeSpec`
describes (another router, extra submodules, router jitter, another expert weight layout, a
custom gate activation) keeps Hugging Face's forward; the patch report names the missing feature.
"""

from __future__ import annotations

import functools
import numbers
import sys
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from lightning_fastft.architectures import ArchitectureSpec
from lightning_fastft.kernels.clamped_swiglu import ClampedSwiGLU
from lightning_fastft.kernels.moe import ExpertLora, moe_experts
from lightning_fastft.training.checkpointing import output_unused

EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
_QWEN2_SHARED = ("shared_expert", "shared_expert_gate")
_EXPERT_LAYOUTS = {
    "concatenated": {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True},
    "interleaved": {"has_gate": True, "has_bias": True, "is_transposed": True, "is_concatenated": False},
}
"""``MoeSpec.expert_layout`` -> the layout attributes transformers' ``use_experts_implementation``
sets on the experts module."""


@functools.cache
def _param_wrapper_class():
    from peft.tuners.lora.layer import ParamWrapper

    return ParamWrapper


@dataclass(frozen=True)
class _MoePlan:
    activation: str | None  # the GLU kernel's activation name; None: the experts' clamped SwiGLU
    router_attribute: str
    interleaved: bool  # gpt-oss's experts: biases, (E, in, out) weights, interleaved gate/up
    returns_router_scores: bool
    shared_expert: bool  # Qwen2-MoE: sigmoid(shared_expert_gate(x)) * shared_expert(x) added
    fused_lora: bool
    output_to_residual: bool


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside PEFT's (nested) ``ParamWrapper``s."""
    while isinstance(module, _param_wrapper_class()):
        module = module.base_layer
    return module


def _known_gate_activation(experts: nn.Module, block: nn.Module, spec: ArchitectureSpec) -> bool:
    """Whether the experts gate as the kernels do: transformers' default GLU gate, or (interleaved
    layout) the ``_apply_gate`` of the architecture's own experts class in its modeling module."""
    if spec.moe.expert_layout == "interleaved":
        hf_experts = getattr(sys.modules[type(block).__module__], spec.experts_class, None)
        return getattr(type(experts), "_apply_gate", None) is getattr(hf_experts, "_apply_gate", False)
    from transformers.integrations import moe as hf_moe

    return getattr(type(experts), "_apply_gate", None) is getattr(hf_moe, "_default_apply_gate", None)


def _expert_shapes_fit(experts: nn.Module, interleaved: bool) -> bool:
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if gate_up.dim() != 3 or down.dim() != 3:
        return False
    if not interleaved:
        return down.shape[1:] == (gate_up.shape[2], gate_up.shape[1] // 2)
    n_experts, hidden_size, width = gate_up.shape
    biases = (experts.gate_up_proj_bias.shape, experts.down_proj_bias.shape)
    return down.shape[1:] == (width // 2, hidden_size) and biases == ((n_experts, width), (n_experts, hidden_size))


def unsupported_moe_feature(block: nn.Module, spec: ArchitectureSpec, activation: str | None) -> str | None:
    """Why ``block`` cannot run the grouped-GEMM forward (the missing feature), or None."""
    router_name = spec.moe.router_attribute
    interleaved = spec.moe.expert_layout == "interleaved"
    if not isinstance(getattr(block, router_name, None), nn.Module) or not isinstance(
        getattr(block, "experts", None), nn.Module
    ):
        return f"no {router_name}/experts submodules"
    children = {name for name, _ in block.named_children()}
    expected = {router_name, "experts"} | (set(_QWEN2_SHARED) if "shared_expert" in children else set())
    if children != expected:
        return f"submodules {sorted(children - expected) or sorted(expected - children)} besides {router_name}/experts"
    router = _unwrap(getattr(block, router_name))  # PEFT's own "all-linear" wraps the router's weight
    if type(router).__name__ != spec.router_class:
        return f"router {type(router).__name__} (supported: {spec.router_class})"
    if getattr(block, "jitter_noise", 0) > 0:
        return "router jitter noise (router_jitter_noise > 0)"
    experts = _unwrap(block.experts)
    if type(experts).__name__ != spec.experts_class:
        return f"experts {type(experts).__name__} (supported: {spec.experts_class})"
    expected_layout = _EXPERT_LAYOUTS[spec.moe.expert_layout]
    layout = {name: getattr(experts, name, None) for name in expected_layout}
    if layout != expected_layout:
        return f"expert weight layout {layout} (supported: {expected_layout})"
    if getattr(experts, "has_post_expert_norm", False) or not _known_gate_activation(experts, block, spec):
        return "a post-expert norm or custom gate activation"
    if interleaved and not all(isinstance(getattr(experts, name, None), numbers.Real) for name in ("alpha", "limit")):
        return "a clamped SwiGLU without numeric alpha/limit attributes"
    if not interleaved and activation is None:
        return "an expert activation without a GLU kernel"
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if not _expert_shapes_fit(experts, interleaved):
        return f"expert weights gate_up_proj {tuple(gate_up.shape)} / down_proj {tuple(down.shape)}"
    if gate_up.shape[0] != router.num_experts:
        return f"{gate_up.shape[0]} expert weights for a router over {router.num_experts} experts"
    return None


@functools.cache
def _warn_qlora_experts() -> None:
    warnings.warn(
        "lightning_fastft: QLoRA on a mixture-of-experts model quantises its linear layers (attention, "
        "dense and shared-expert MLPs); the stacked expert weights stay in their dtype and their LoRA "
        "trains on them unquantised. Quantisation error is larger on MoE models: bf16 LoRA is advised",
        stacklevel=4,
    )


@functools.cache
def _warn_quantized_experts() -> None:
    warnings.warn(
        "lightning_fastft: quantised expert weights run Hugging Face's experts forward (dequantised per "
        "expert); bf16 LoRA is advised for mixture-of-experts models, whose quantisation error is larger",
        stacklevel=4,
    )


def _fused_experts(module: nn.Module) -> tuple[nn.Module, ExpertLora | None, ExpertLora | None] | None:
    """(base experts, gate_up LoRA, down LoRA) read from PEFT's ParamWrappers, or None when the
    fused path does not cover their state (then the module's own forward runs)."""
    lora: dict[str, ExpertLora] = {}
    while isinstance(module, _param_wrapper_class()):
        if module._forward_hooks or module._forward_pre_hooks or module.parameter_name not in EXPERT_PARAMETERS:
            return None
        active = [name for name in module.active_adapters if name in module.lora_A]
        if module.merged or len(active) > 1:
            return None
        if active and not module.disable_adapters:
            # PEFT's factors multiply as the weight is stored: (E, out, in) = b a when it swapped
            # in/out features, (E, in, out) = a^T b^T for a transposed weight (gpt-oss)
            lhs, rhs, scale = module.get_delta_factors(active[0])
            b, a = (lhs, rhs) if module._did_swap_in_out_features else (rhs.transpose(1, 2), lhs.transpose(1, 2))
            lora[module.parameter_name] = ExpertLora(b.contiguous(), a.contiguous(), scale)  # b: a permuted view
        module = module.base_layer
    if module._forward_hooks or module._forward_pre_hooks or nn.utils.parametrize.is_parametrized(module):
        return None
    if not all(type(getattr(module, name)) in (nn.Parameter, torch.Tensor) for name in EXPERT_PARAMETERS):
        _warn_quantized_experts()
        return None
    return module, lora.get("gate_up_proj"), lora.get("down_proj")


def _moe_block_forward(self: nn.Module, hidden_states: torch.Tensor):
    """The sparse block: the architecture's router, then all experts by grouped GEMMs (gpt-oss:
    returns ``(output, routing weights)``)."""
    plan: _MoePlan = self._fastft_moe
    shape = hidden_states.shape
    flat = hidden_states.reshape(-1, shape[-1])
    _, top_k_weights, top_k_index = getattr(self, plan.router_attribute)(flat)
    fused = _fused_experts(self.experts)
    if fused is not None and not plan.fused_lora and (fused[1] is not None or fused[2] is not None):
        fused = None  # LoRA on the experts with fused_lora off: PEFT's forward
    if fused is None:
        out = self.experts(flat, top_k_index, top_k_weights)
    else:
        experts, gate_up_lora, down_lora = fused
        activation = ClampedSwiGLU(experts.alpha, experts.limit) if plan.interleaved else plan.activation
        biases = (experts.gate_up_proj_bias, experts.down_proj_bias) if plan.interleaved else (None, None)
        out = moe_experts(
            flat, top_k_index, top_k_weights, experts.gate_up_proj, experts.down_proj, activation,
            gate_up_lora, down_lora, *biases, transposed=plan.interleaved,
            output_unused=plan.output_to_residual and output_unused(self),
        )  # fmt: skip
    if plan.shared_expert:
        out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
    return (out.reshape(shape), top_k_weights) if plan.returns_router_scores else out.reshape(shape)


def has_expert_lora(block: nn.Module) -> bool:
    return isinstance(block.experts, _param_wrapper_class())


def patch_moe_block(
    block: nn.Module, spec: ArchitectureSpec, activation: str | None, fused_lora: bool, output_to_residual: bool, install
) -> None:
    """Install the grouped-GEMM forward on one checked block (``install(module, forward)``);
    ``output_to_residual``: the decoder layer only adds the block's output to the residual."""
    interleaved = spec.moe.expert_layout == "interleaved"
    block._fastft_moe = _MoePlan(
        activation=None if interleaved else activation,
        router_attribute=spec.moe.router_attribute,
        interleaved=interleaved,
        returns_router_scores=spec.moe.returns_router_scores,
        shared_expert=hasattr(block, "shared_expert"),
        fused_lora=fused_lora,
        output_to_residual=output_to_residual,
    )
    install(block, _moe_block_forward)


_NOT_LORA_TARGETS = ("lm_head", "shared_expert_gate")
"""Linear layers "all-linear" leaves frozen on a mixture-of-experts model: the LM head (as PEFT
does) and Qwen2-MoE's one-output shared-expert gate, a router like the experts' own."""


def moe_lora_targets(model: nn.Module) -> tuple[list[str], list[str]] | None:
    """What ``target_modules="all-linear"`` means on a supported mixture-of-experts model:
    ``(target_modules, target_parameters)`` = every linear layer's name but the LM head and the
    shared-expert gate, and the stacked expert weights (PEFT's ``target_parameters``). PEFT's own
    "all-linear" adapts the routers (their ``weight`` parameter) and none of the experts; routers
    stay frozen here, as MoE fine-tuning usually keeps them. None for any other model:
    "all-linear" keeps PEFT's meaning."""
    from lightning_fastft.architectures import ARCHITECTURES

    spec = ARCHITECTURES.get(getattr(getattr(model, "config", None), "model_type", None))
    if spec is None or not spec.moe:
        return None
    from lightning_fastft.bnb import is_4bit_linear

    if getattr(model, "is_loaded_in_4bit", False):
        _warn_qlora_experts()

    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if (type(module) is nn.Linear or is_4bit_linear(module)) and name.rsplit(".", 1)[-1] not in _NOT_LORA_TARGETS
    }
    return sorted(names), [f"experts.{name}" for name in EXPERT_PARAMETERS]
