"""Patch HF causal LMs (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2; Qwen3-MoE, Qwen2-MoE, Mixtral,
gpt-oss) to run the fast kernels.

Only module *instances* are changed (``module.forward`` set to an :class:`InstanceForward`), never
classes or module-level functions, so an unpatched model in the same process keeps HF's code.
Patching again keeps the installed forwards and re-plans the modules it patches with the new
switches (a switch that is off never unpatches). Which projections run fused LoRA is decided
once per forward pass of the decoder stack (a forward pre-hook on it starts a new
:class:`ForwardPasses` entry) and reused by that pass's checkpoint recomputation, so it
follows adapters added, merged or disabled between passes; the tensors themselves are read at
every call. A patched model holds no closures: it deep-copies and pickles.
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import (
    CausalLMOutputWithPast,
    MoeCausalLMOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple

from lightning_fastft._versions import tested_window
from lightning_fastft.architectures import ARCHITECTURES, ArchitectureSpec
from lightning_fastft.attention import route_packed_batches
from lightning_fastft.constants import IGNORE_INDEX
from lightning_fastft.kernels.cross_entropy import causal_lm_loss
from lightning_fastft.kernels.glu import glu
from lightning_fastft.kernels.rms_norm import rms_norm
from lightning_fastft.kernels.rope import rope_qk_
from lightning_fastft.patching.lora import (
    GLU_MLP,
    O_PROJ,
    QKV,
    fused_mlp,
    fused_o,
    fused_qkv,
    projection_plans,
)
from lightning_fastft.patching.moe import (
    has_expert_lora,
    patch_moe_block,
    unsupported_moe_feature,
)
from lightning_fastft.patching.options import PatchOptions, takes_patch_options
from lightning_fastft.training.checkpointing import apply_activation_checkpointing, output_unused
from lightning_fastft.training.cuda_graphs import apply_cuda_graphs, remove_cuda_graphs

GLU_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
"""HF ``hidden_act`` names the GLU kernel computes, mapped to the kernel's activation name."""

PATCH_KINDS = (
    "rms_norm",
    "attention",
    "rope",
    "mlp",
    "lora_qkv",
    "lora_o",
    "lora_mlp",
    "moe",
    "lora_experts",
    "cross_entropy",
)

CACHE_ARGUMENT = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
"""The KV cache's argument and output-field name in the installed transformers (renamed from
``past_key_values`` in 5.24). The patched forwards accept both names."""

_CACHE = "<cache>"
_LM_PARAMETERS = ("input_ids", "attention_mask", "position_ids", _CACHE, "inputs_embeds", "labels", "use_cache")
HF_FORWARD_PARAMETERS: dict[str, tuple[tuple[str, ...], ...]] = {
    "rms_norm": (("hidden_states",), ("x",)),
    "attention": (("hidden_states", "position_embeddings", "attention_mask", _CACHE, "**kwargs"),),
    "mlp": (("x",),),
    "moe": (("hidden_states",),),
    "cross_entropy": (
        (*_LM_PARAMETERS, "logits_to_keep", "**kwargs"),
        (*_LM_PARAMETERS, "output_router_logits", "logits_to_keep", "**kwargs"),  # mixture of experts
    ),
}
"""The parameters of each Hugging Face forward a patch replaces, as every transformers release of
the tested window has them (``<cache>``: :data:`CACHE_ARGUMENT`). A class whose forward takes
anything else keeps Hugging Face's forward, with a warning."""


try:  # transformers >= 5.23: also position tensors per row and boolean masks
    from transformers.modeling_utils import slice_logits_to_keep as _slice_logits_to_keep
except ImportError:  # earlier releases of the window slice inline like this

    def _slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, indices, :]


def hf_forward_parameters(cls: type) -> tuple[str, ...]:
    """``cls.forward``'s parameter names after ``self`` (through decorators), ``**`` marking
    keyword catch-alls and :data:`CACHE_ARGUMENT` written ``<cache>``."""
    names = []
    for parameter in list(inspect.signature(cls.forward).parameters.values())[1:]:
        prefix = {parameter.VAR_KEYWORD: "**", parameter.VAR_POSITIONAL: "*"}.get(parameter.kind, "")
        names.append(_CACHE if parameter.name == CACHE_ARGUMENT else prefix + parameter.name)
    return tuple(names)


@functools.cache
def unknown_hf_forward(kind: str, cls: type) -> str | None:
    """Why ``cls``'s forward cannot be replaced by the ``kind`` patch (warned once per class),
    or None when its parameters are ones the patch was written for."""
    parameters = hf_forward_parameters(cls)
    if parameters in HF_FORWARD_PARAMETERS[kind]:
        return None
    window = ", ".join(f"{name}{req.specifier}" for name, req in tested_window().items()) or "see pyproject.toml"
    reason = (
        f"{kind}: {cls.__name__}.forward{parameters} is not a signature this version of lightning_fastft "
        f"was written for (tested window: {window}); Hugging Face's forward is kept for these modules"
    )
    warnings.warn(f"lightning_fastft: {reason}", stacklevel=4)
    return reason


@dataclass
class ModelPatchReport:
    """What was patched in one HF causal LM: counts of patched modules per kind, and what was not."""

    path: str
    architecture: str
    model_type: str
    patched: Counter = field(default_factory=Counter)
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        counts = ", ".join(f"{kind} {self.patched[kind]}" for kind in PATCH_KINDS if self.patched[kind])
        lines = [f"{self.path} ({self.architecture}, model_type {self.model_type!r}): {counts or 'nothing patched'}"]
        lines += [f"  skipped: {reason}" for reason in self.skipped]
        return "\n".join(lines)


@dataclass
class PatchReport:
    """The result of ``patch_model``: one ``ModelPatchReport`` per HF causal LM found."""

    models: list[ModelPatchReport] = field(default_factory=list)

    def __str__(self) -> str:
        if not self.models:
            return "lightning_fastft: no Hugging Face causal LM found; nothing patched"
        body = "\n".join(str(model) for model in self.models)
        return f"lightning_fastft patching report, {len(self.models)} model(s):\n{body}"


class InstanceForward:
    """``module.forward`` replacement: ``function(module, ...)``. Unlike a bound method it
    survives pickling (e.g. for ``ddp_spawn``) and reports ``function``'s signature minus ``self``."""

    __slots__ = ("function", "module")

    def __init__(self, function: Callable, module: nn.Module):
        self.function, self.module = function, module

    def __call__(self, *args, **kwargs):
        return self.function(self.module, *args, **kwargs)

    def __reduce__(self):
        return InstanceForward, (self.function, self.module)

    @property
    def __signature__(self) -> inspect.Signature:
        signature = inspect.signature(self.function)
        return signature.replace(parameters=list(signature.parameters.values())[1:])


@dataclass(frozen=True)
class _AttentionPlan:
    spec: ArchitectureSpec
    rope: bool  # our in-place RoPE kernel; False: the architecture's own apply_rotary_pos_emb
    angles_once: bool  # cos/sin hold each angle once (gpt-oss): duplicated for the kernel, as HF builds them
    fused_lora: bool  # fused LoRA QKV / O whenever projection_plans accepts the projections
    hf_apply_rotary: Callable
    hf_eager_attention: Callable


@dataclass(frozen=True)
class _MlpPlan:
    activation: str | None  # the GLU kernel's name for the MLP activation; None: no GLU path
    use_glu: bool
    fused_lora: bool
    output_to_residual: bool  # see _adds_to_residual


class ForwardPasses:
    """The fused-LoRA decisions of one patched decoder stack for its current forward pass.

    The stack's forward pre-hook :func:`_start_forward_pass` empties ``plans`` and opens the pass;
    its forward hook closes it. Patched attention/MLP modules store their
    ``projection_plans`` while a pass is open and reuse them until the next pass starts (the
    backward's checkpoint recomputation runs after the stack's forward has returned). Outside
    any pass they decide afresh at each call.
    """

    def __init__(self) -> None:
        self.plans: dict = {}
        self.open = False


def _start_forward_pass(stack: nn.Module, args) -> None:
    passes: ForwardPasses = stack._fastft_passes
    passes.plans = {}
    passes.open = True


def _end_forward_pass(stack: nn.Module, args, output) -> None:
    stack._fastft_passes.open = False


def _install_forward_passes(stack: nn.Module) -> ForwardPasses:
    """The stack's :class:`ForwardPasses`, created (with its two hooks) on first use."""
    passes = stack.__dict__.get("_fastft_passes")
    if passes is None:
        passes = stack._fastft_passes = ForwardPasses()
        stack.register_forward_pre_hook(_start_forward_pass)
        stack.register_forward_hook(_end_forward_pass)
    return passes


def _pass_plans(module: nn.Module, names: tuple[str, ...]):
    """``projection_plans(module, names)``, decided once per forward pass of the stack."""
    passes: ForwardPasses | None = module.__dict__.get("_fastft_passes")
    if passes is None:
        return projection_plans(module, names)
    key = (module, names)
    if key in passes.plans:
        return passes.plans[key]
    plans = projection_plans(module, names)
    if passes.open:
        passes.plans[key] = plans
    return plans


def _rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    spec: ArchitectureSpec = self._fastft_spec
    eps = getattr(self, spec.norm_eps_attribute)
    return rms_norm(hidden_states, self.weight, eps, offset=spec.norm_offset, casting=spec.norm_casting)


def _attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    cache=None,
    past_key_values=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HF's attention forward with fused LoRA projections and our in-place RoPE.

    Queries/keys stay (batch, seq, heads, head_dim) through the q/k norms and RoPE and are only
    transposed (a view) for the attention function HF picks from ``config._attn_implementation``.
    The KV cache arrives as ``cache`` (transformers >= 5.24) or ``past_key_values`` (earlier).
    """
    cache = cache if cache is not None else past_key_values
    plan: _AttentionPlan = self._fastft_attention
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)

    qkv_plans = _pass_plans(self, QKV) if plan.fused_lora else None
    if qkv_plans is not None:
        query, key, value = fused_qkv(qkv_plans, hidden_states)
    else:
        query, key, value = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    query, key, value = query.view(hidden_shape), key.view(hidden_shape), value.view(hidden_shape)
    if hasattr(self, "q_norm"):  # Qwen3 normalises each head before RoPE
        query, key = self.q_norm(query), self.k_norm(key)

    cos, sin = position_embeddings
    if plan.rope:
        if plan.angles_once:  # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) either way
            cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
        query, key = rope_qk_(query, key, cos, sin)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
    else:
        query, key = plan.hf_apply_rotary(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
    value = value.transpose(1, 2)

    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx)

    attention_function = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, plan.hf_eager_attention
    )
    attn_output, attn_weights = attention_function(
        self,
        query,
        key,
        value,
        attention_mask,
        dropout=self.attention_dropout if self.training else 0.0,
        scaling=self.scaling,
        **plan.spec.attention_kwargs(self),
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    o_plans = _pass_plans(self, O_PROJ) if plan.fused_lora else None
    attn_output = fused_o(o_plans, attn_output) if o_plans is not None else self.o_proj(attn_output)
    return attn_output, attn_weights


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    plan: _MlpPlan = self._fastft_mlp
    plans = _pass_plans(self, GLU_MLP) if plan.fused_lora and plan.activation else None
    if plans is not None:
        return fused_mlp(plans, x, plan.activation, output_unused=plan.output_to_residual and output_unused(self))
    if not plan.use_glu:  # the mlp switch is off and LoRA stopped being fusable: HF's forward
        return type(self).forward(self, x)
    return self.down_proj(glu(self.gate_proj(x), self.up_proj(x), plan.activation))


@can_return_tuple
def _causal_lm_forward(
    self: PreTrainedModel,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    cache=None,
    inputs_embeds: torch.Tensor | None = None,
    labels: torch.LongTensor | None = None,
    use_cache: bool | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    past_key_values=None,
    output_router_logits: bool | None = None,
    **kwargs,
) -> CausalLMOutputWithPast:
    """HF's causal-LM forward; training with labels computes the loss by fused linear cross
    entropy straight from the hidden states and returns ``logits=None``.

    The KV cache is taken as ``cache`` or ``past_key_values`` and handed on (and returned) under
    the name the installed transformers uses (:data:`CACHE_ARGUMENT`). A mixture-of-experts
    model adds, with ``output_router_logits`` (default: the config's), Hugging Face's own
    load-balancing loss (its modeling module's ``load_balancing_loss_func`` on the recorded
    router logits) times ``router_aux_loss_coef`` to the loss, as its forward does.
    """
    cache = cache if cache is not None else past_key_values
    spec: ArchitectureSpec = self._fastft_spec
    if spec.moe:
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        kwargs["output_router_logits"] = output_router_logits
    outputs = getattr(self, self.base_model_prefix)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        **{CACHE_ARGUMENT: cache},
        **kwargs,
    )
    hidden_states = _slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
    kwargs.pop("output_router_logits", None)
    softcap = getattr(self.config, spec.final_softcap_attribute) if spec.final_softcap_attribute else None

    loss = logits = None
    if labels is not None and self.training and _plain_lm_head(self) is not None:
        loss = causal_lm_loss(
            hidden_states,
            self.lm_head.weight,
            labels,
            shift_labels=kwargs.get("shift_labels"),
            softcap=softcap,
            ignore_index=kwargs.get("ignore_index", IGNORE_INDEX),
            num_items_in_batch=kwargs.get("num_items_in_batch"),
        )
    else:
        logits = self.lm_head(hidden_states)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)

    if spec.moe:
        aux_loss = None
        if output_router_logits:
            load_balancing_loss = sys.modules[type(self).__module__].load_balancing_loss_func
            aux_loss = load_balancing_loss(
                outputs.router_logits, self.num_experts, self.num_experts_per_tok, attention_mask
            )
            if loss is not None:
                loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            **{CACHE_ARGUMENT: getattr(outputs, CACHE_ARGUMENT)},
        )
    return CausalLMOutputWithPast(
        loss=loss,
        logits=logits,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        **{CACHE_ARGUMENT: getattr(outputs, CACHE_ARGUMENT)},
    )


def _plain_lm_head(model: nn.Module) -> nn.Linear | None:
    """The LM head when it is a bias-free ``nn.Linear`` (not PEFT-wrapped or quantised)."""
    head = getattr(model, "lm_head", None)
    return head if type(head) is nn.Linear and head.bias is None else None


def computes_fused_loss(model: nn.Module) -> bool:
    """Whether the training loss of the HF causal LM ``model`` (given labels) comes from fused linear
    cross-entropy, without logits: the ``cross_entropy`` patch is installed and its LM head is plain."""
    patched = getattr(model.__dict__.get("forward"), "function", None) is _causal_lm_forward
    return patched and _plain_lm_head(model) is not None


def _install_forward(module: nn.Module, forward: Callable) -> None:
    """Set ``forward`` on this instance only; a no-op when it already runs it."""
    if getattr(module.__dict__.get("forward"), "function", None) is not forward:
        module.forward = InstanceForward(forward, module)


def is_causal_lm(module: nn.Module) -> bool:
    return isinstance(module, PreTrainedModel) and isinstance(module, GenerationMixin)


def _replaceable(kind: str, module: nn.Module, entry: ModelPatchReport) -> bool:
    """False (noted once in ``entry``) when ``module``'s class forward is not one ``kind`` replaces."""
    reason = unknown_hf_forward(kind, type(module))
    if reason is not None and reason not in entry.skipped:
        entry.skipped.append(reason)
    return reason is None


def _has_lora(*modules: nn.Module) -> bool:
    return any(hasattr(module, "lora_A") for module in modules)


def _patch_attention(
    attention: nn.Module,
    spec: ArchitectureSpec,
    rope: bool,
    fused_lora: bool,
    entry: ModelPatchReport,
    unfused: Counter,
    passes: ForwardPasses,
):
    fused_qkv = fused_lora and projection_plans(attention, QKV) is not None
    fused_o = fused_lora and projection_plans(attention, O_PROJ) is not None
    unfused["lora_qkv"] += (
        fused_lora and not fused_qkv and _has_lora(attention.q_proj, attention.k_proj, attention.v_proj)
    )
    unfused["lora_o"] += fused_lora and not fused_o and _has_lora(attention.o_proj)
    if not (rope or fused_qkv or fused_o):
        return
    attention._fastft_passes = passes
    hf_modeling = sys.modules[type(attention).__module__]
    attention._fastft_attention = _AttentionPlan(
        spec=spec,
        rope=rope,
        angles_once=spec.rope_angles_once,
        fused_lora=fused_lora,
        hf_apply_rotary=hf_modeling.apply_rotary_pos_emb,
        hf_eager_attention=hf_modeling.eager_attention_forward,
    )
    _install_forward(attention, _attention_forward)
    entry.patched["attention"] += 1
    entry.patched["rope"] += rope
    entry.patched["lora_qkv"] += fused_qkv
    entry.patched["lora_o"] += fused_o


def _adds_to_residual(name: str, spec: ArchitectureSpec) -> bool:
    """Whether the decoder layer only adds the output of the MLP or sparse block at ``name`` to the
    residual: it is the layer's ``mlp`` (not Qwen2-MoE's shared expert, whose output the block
    gates) and the architecture adds it unnormalised. Then a checkpointed layer's recompute may
    skip computing it (:func:`~lightning_fastft.training.checkpointing.output_unused`)."""
    return spec.mlp_output_to_residual and name.rpartition(".")[2] == "mlp"


def _patch_mlp(
    mlp: nn.Module,
    activation: str | None,
    use_glu: bool,
    fused_lora: bool,
    output_to_residual: bool,
    entry: ModelPatchReport,
    unfused: Counter,
    passes: ForwardPasses,
):
    fused = bool(fused_lora and activation) and projection_plans(mlp, GLU_MLP) is not None
    unfused["lora_mlp"] += fused_lora and not fused and _has_lora(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    use_glu = use_glu and activation is not None
    if not (fused or use_glu):
        return
    mlp._fastft_passes = passes
    mlp._fastft_mlp = _MlpPlan(activation, use_glu, fused_lora, output_to_residual)
    _install_forward(mlp, _mlp_forward)
    entry.patched["mlp"] += not fused
    entry.patched["lora_mlp"] += fused


def _patch_moe(
    block: nn.Module, spec: ArchitectureSpec, activation: str | None, fused_lora: bool, output_to_residual: bool, entry
) -> None:
    missing = unsupported_moe_feature(block, spec, activation)
    if missing is not None:
        reason = f"moe: {type(block).__name__} has {missing}; Hugging Face's forward is kept for these blocks"
        if reason not in entry.skipped:
            entry.skipped.append(reason)
            warnings.warn(f"lightning_fastft: {reason}", stacklevel=5)
        return
    patch_moe_block(block, spec, activation, fused_lora, output_to_residual, _install_forward)
    entry.patched["moe"] += 1
    entry.patched["lora_experts"] += fused_lora and has_expert_lora(block)


def _patch_causal_lm(path: str, model: PreTrainedModel, switches: dict[str, bool]) -> ModelPatchReport:
    model_type = getattr(model.config, "model_type", "?")
    entry = ModelPatchReport(path=path, architecture=type(model).__name__, model_type=model_type)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        entry.skipped.append(f"no patching spec for model_type {model_type!r} (supported: {', '.join(ARCHITECTURES)})")
        return entry

    entry.skipped += [f"{kind}: switched off" for kind, on in switches.items() if not on]
    hidden_act = getattr(model.config, spec.activation_attribute, None)
    activation = GLU_ACTIVATIONS.get(hidden_act)
    if activation is None:
        entry.skipped.append(f"mlp: activation {hidden_act!r} has no GLU kernel")

    unfused = Counter()
    passes = _install_forward_passes(getattr(model, model.base_model_prefix, model))
    for name, module in model.named_modules():
        class_name = type(module).__name__
        if class_name == spec.norm_class and switches["rms_norm"]:
            if _replaceable("rms_norm", module, entry):
                module._fastft_spec = spec
                _install_forward(module, _rms_norm_forward)
                entry.patched["rms_norm"] += 1
        elif class_name == spec.attention_class:
            if _replaceable("attention", module, entry):
                _patch_attention(module, spec, switches["rope"], switches["fused_lora"], entry, unfused, passes)
        elif class_name == spec.moe_block_class:  # before the MLP: gpt-oss's sparse block is GptOssMLP
            if switches["mlp"] and _replaceable("moe", module, entry):
                _patch_moe(module, spec, activation, switches["fused_lora"], _adds_to_residual(name, spec), entry)
        elif class_name == spec.mlp_class:
            if _replaceable("mlp", module, entry):
                to_residual = _adds_to_residual(name, spec)
                _patch_mlp(module, activation, switches["mlp"], switches["fused_lora"], to_residual, entry, unfused, passes)
    entry.skipped += [f"{kind}: {n} LoRA modules not fusable, PEFT's forward kept" for kind, n in unfused.items() if n]

    if switches["cross_entropy"] and _replaceable("cross_entropy", model, entry):
        if _plain_lm_head(model) is None:
            entry.skipped.append(
                f"cross_entropy: lm_head is {type(model.lm_head).__name__}, not a bias-free nn.Linear; "
                "the loss is computed from materialised logits"
            )
        model._fastft_spec = spec
        _install_forward(model, _causal_lm_forward)
        entry.patched["cross_entropy"] += 1
    return entry


@takes_patch_options
def patch_model(model: nn.Module, **options: Any) -> PatchReport:
    """Patch every HF causal LM inside ``model`` (itself one, a PEFT model, a LightningModule...)
    with the :class:`~lightning_fastft.patching.options.PatchOptions` given as keywords.

    ``fused_lora`` alone also replaces the attention/MLP forwards that have a fused path; with
    ``checkpointing`` set, the decoder layers are then wrapped by
    :func:`~lightning_fastft.training.checkpointing.apply_activation_checkpointing`, and with
    ``cuda_graphs`` last by :func:`~lightning_fastft.training.cuda_graphs.apply_cuda_graphs`. An
    architecture without a spec is left as it is, with one warning.
    """
    patch_options = PatchOptions(**options)
    switches = patch_options.kernel_switches()
    report = PatchReport()
    remove_cuda_graphs(model)  # captured from the forwards patched now: undone first, redone last
    for path, module in model.named_modules():
        if is_causal_lm(module):
            report.models.append(_patch_causal_lm(path or type(model).__name__, module, switches))
            route_packed_batches(module)
    unpatched = [entry for entry in report.models if entry.model_type not in ARCHITECTURES]
    if not report.models or unpatched:
        warnings.warn(
            f"lightning_fastft: some models were left unpatched and run Hugging Face's own code.\n{report}",
            stacklevel=2,
        )
    if patch_options.checkpointing is not None:
        apply_activation_checkpointing(model, patch_options.checkpointing, **patch_options.checkpointing_options())
    if patch_options.cuda_graphs:
        apply_cuda_graphs(model)
    return report
