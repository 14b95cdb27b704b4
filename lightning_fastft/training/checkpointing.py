"""Activation checkpointing of decoder layers, with the saved layer inputs optionally in host memory.

Each decoder layer *instance* gets an instance ``forward`` (state_dict keys are untouched), so that
during training a layer keeps only its input hidden state and recomputes everything else in backward:

* ``checkpointing="recompute"``: the same layer Function as offload with the input kept on the device
  (:class:`DeviceStore`); measured faster than non-reentrant ``torch.utils.checkpoint`` on the
  8B LoRA step (see benchmarks/results/archive/2026-11-23/train_partA.md).
* ``checkpointing="offload"``: the input is copied device -> pinned host memory on a side CUDA stream while
  compute goes on; in backward it is copied back, and the input of the next layer to be recomputed
  is prefetched on the side stream while the current one recomputes. Without CUDA this falls back
  to ``"recompute"`` with a one-time warning (``HostOffloader(emulate_on_cpu=True)`` runs the same
  bookkeeping with synchronous copies, for tests).

Under ``no_grad``/``inference_mode``, or when nothing in a layer needs a gradient, the layer runs
its plain forward. ``checkpoint_fraction < 1`` checkpoints only part of each decoder stack (see
:func:`checkpointed_layer_indices`): less recompute for more activation memory.

``checkpointing="auto"`` (:class:`AutoCheckpointing`) picks each layer's mode (none, recompute or
offload) at the first training forward, when the batch shape is known, to fit ``memory_budget_gib``
as fast as it can (the rule and the estimate: :mod:`lightning_fastft.training.memory_plan`), and
plans again when a batch brings more tokens than planned for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import warnings
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.utils._pytree as pytree
from lightning.fabric.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from lightning_fastft.patching.options import (
    Checkpointing,
    LayerCheckpointing,
    check_checkpoint_fraction,
    check_checkpointing,
)
from lightning_fastft.training.memory_plan import (
    GIB,
    HOST_MARGIN_BYTES,
    HOST_PIECE_BYTES,
    CheckpointPlan,
    StackMemory,
    default_memory_budget,
    host_memory_available,
    host_piece_sizes,
    loss_workspace_bytes,
    model_state_bytes,
    plan_checkpointing,
    saved_activation_bytes,
)

_WRAPPED_ATTRIBUTE = "_fastft_checkpointing"  # the layer's _Wrapping
GRAPHED_ATTRIBUTE = "_fastft_cuda_graphs"  # set by training.cuda_graphs on the layers it replays from graphs
_warned_cpu_fallback = False
_TENSOR_SLOT = object()  # stands for a tensor in a flattened call or output held by _LayerCall
_side_outputs: list[list[Tensor]] = []  # one list per checkpointed layer call running (see keep_differentiable)


def keep_differentiable(tensor: Tensor) -> None:
    """Give ``tensor`` -- made inside a decoder layer and read outside it, e.g. router logits
    that Hugging Face records for the load-balancing loss -- its gradient under activation
    checkpointing: the checkpointed layer returns it as an extra output of its autograd Function
    (the same tensor object, which so gains the layer's backward), and the backward recompute
    takes its gradient into the layer's vector-Jacobian product. A no-op outside checkpointed
    layers (there the tensor keeps its graph anyway)."""
    if _side_outputs:
        _side_outputs[-1].append(tensor)


class _KeepOutput:
    """Forward hook: :func:`keep_differentiable` on ``output[index]`` (a class, so models pickle)."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, (tuple, list)) and len(output) > self.index and isinstance(output[self.index], Tensor):
            keep_differentiable(output[self.index])


def keep_router_logits(model: nn.Module) -> None:
    """Hook (once) every module whose output a HF model records as ``router_logits`` (its
    ``_can_record_outputs``): the load-balancing loss reads them outside the layers."""
    for hf_model in model.modules():
        recorder = (getattr(hf_model, "_can_record_outputs", None) or {}).get("router_logits")
        target = getattr(recorder, "target_class", None)
        if not isinstance(target, type):
            continue
        for module in hf_model.modules():
            if isinstance(module, target) and not module.__dict__.get("_fastft_keeps_output", False):
                module.register_forward_hook(_KeepOutput(recorder.index))
                module._fastft_keeps_output = True


_recomputing: list[bool] = [False]


def recomputing() -> bool:
    """Whether a checkpointed layer's forward is running again for its backward. Its outputs' values
    are not read then (only the tensors its operations save, and the autograd graph): an operation
    whose output only flows to the layer's output may skip computing it (the experts' down
    projection of a mixture-of-experts layer, :mod:`~lightning_fastft.patching.moe`)."""
    return _recomputing[-1]


def output_unused(module: nn.Module) -> bool:
    """Whether nothing reads ``module``'s output value now: in a checkpointed layer's recompute, for
    a module whose output the decoder layer only adds to the residual
    (:attr:`~lightning_fastft.architectures.ArchitectureSpec.mlp_output_to_residual`, which the
    caller checks) and that no forward hook sees."""
    return recomputing() and not (module._forward_hooks or nn.modules.module._global_forward_hooks)


@contextlib.contextmanager
def _recompute():
    _recomputing.append(True)
    try:
        yield
    finally:
        _recomputing.pop()


@contextlib.contextmanager
def collecting_side_outputs():
    """The tensors handed to :func:`keep_differentiable` inside (by layers not checkpointed within it;
    a checkpointed layer hands its own on once they have its backward), in call order."""
    _side_outputs.append([])
    try:
        yield _side_outputs[-1]
    finally:
        _side_outputs.pop()


def find_decoder_layer_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The outermost ``ModuleList``s of same-type composite modules holding parameters (decoder stacks)."""
    stacks: list[nn.ModuleList] = []
    inside_stack: set[int] = set()
    for module in model.modules():  # pre-order: a stack is seen before the modules inside it
        if id(module) in inside_stack or not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        first = module[0]
        composite = next(first.children(), None) is not None and next(first.parameters(), None) is not None
        if composite and len({type(layer) for layer in module}) == 1:
            stacks.append(module)
            inside_stack.update(id(inner) for inner in module.modules())
    return stacks


def checkpointed_layer_indices(num_layers: int, checkpoint_fraction: float = 1.0) -> list[int]:
    """Indices of the layers checkpointed in a stack of ``num_layers`` for ``checkpoint_fraction`` of them.

    ``k = floor(f * num_layers + 1/2)`` layers (``f * num_layers`` rounded, halves
    up; 0 for a small fraction of a short stack), spread evenly: layer ``i`` is checkpointed when
    ``floor((i + 1) k / n) > floor(i k / n)``, i.e. the last layer of each of ``k`` equal runs of
    layers (k=2 of n=4: layers 1 and 3; k=1 of n=3: layer 2).
    """
    check_checkpoint_fraction(checkpoint_fraction)
    count = math.floor(checkpoint_fraction * num_layers + 0.5)
    return [i for i in range(num_layers) if (i + 1) * count // num_layers > i * count // num_layers]


@dataclass
class _Wrapping:
    """What :func:`apply_activation_checkpointing` did to one layer: how it is checkpointed now (None:
    not, yet, under ``"auto"``), the planner of ``"auto"`` (or None) and the instance forward it
    replaced (None: the class's)."""

    mode: Optional[LayerCheckpointing]
    planner: Optional[AutoCheckpointing]
    inner_forward: Optional[Callable]


def apply_activation_checkpointing(
    model: nn.Module,
    checkpointing: Checkpointing,
    *,
    checkpoint_fraction: float = 1.0,
    memory_budget_gib: float | None = None,
    offloader: HostOffloader | None = None,
) -> list[nn.Module]:
    """Checkpoint the decoder layers of every HF model inside ``model``; returns the wrapped layers.

    ``model`` may be a HF model, a PEFT model, or any module containing them (a LightningModule).
    ``checkpoint_fraction`` (in (0, 1]) of the layers of each decoder stack are checkpointed, chosen by
    :func:`checkpointed_layer_indices`; the others keep their plain forward and save their
    activations as usual. Router logits that a mixture-of-experts model records for its
    load-balancing loss keep their gradient (:func:`keep_differentiable`).
    ``checkpointing="auto"`` wraps every layer and leaves the choice to an
    :class:`AutoCheckpointing` planner (``memory_budget_gib``: see
    :class:`~lightning_fastft.patching.options.PatchOptions`); its ``offloader`` must be a
    :class:`HostOffloader` (an emulating one lets it offload on the CPU). HF's own gradient
    checkpointing is switched off (with a warning) where it was on. Applying again replaces the
    previous wrapping (layers no longer selected are unwrapped).
    """
    check_checkpointing(
        checkpointing, checkpoint_fraction=checkpoint_fraction, memory_budget_gib=memory_budget_gib, optional=False
    )
    stacks = find_decoder_layer_lists(model)
    if not stacks:
        raise ValueError(f"no decoder-layer ModuleList found inside {type(model).__name__}")
    if any(GRAPHED_ATTRIBUTE in layer.__dict__ for stack in stacks for layer in stack):
        raise ValueError(
            "the decoder layers run from CUDA graphs, captured from their current forwards: call "
            "remove_cuda_graphs(model) first and apply_cuda_graphs(model) after (patch_model does both)"
        )
    _turn_off_hf_gradient_checkpointing(model)
    keep_router_logits(model)
    for stack in stacks:
        for layer in stack:
            _unwrap(layer)
    if checkpointing == "auto":
        if offloader is not None and not isinstance(offloader, HostOffloader):
            raise TypeError(f"checkpointing='auto' offloads with a HostOffloader, got {type(offloader).__name__}")
        AutoCheckpointing(model, stacks, memory_budget_gib, offloader or HostOffloader())
        return [layer for stack in stacks for layer in stack]
    if offloader is None:
        offloader = HostOffloader() if checkpointing == "offload" else DeviceStore()
    layers = [stack[i] for stack in stacks for i in checkpointed_layer_indices(len(stack), checkpoint_fraction)]
    for layer in layers:
        inner_forward = layer.__dict__.get("forward")  # another patch's instance forward, if any
        layer.forward = partial(_offload_forward, layer, layer.forward, offloader, offloader.new_slot())
        layer.__dict__[_WRAPPED_ATTRIBUTE] = _Wrapping(checkpointing, None, inner_forward)
    return layers


def _turn_off_hf_gradient_checkpointing(model: nn.Module) -> None:
    if hf_gradient_checkpointing_on(model):
        warnings.warn(
            "lightning_fastft: turning off HF gradient checkpointing; the decoder layers are "
            "checkpointed by apply_activation_checkpointing instead.",
            stacklevel=3,
        )
        disable_hf_gradient_checkpointing(model)


def checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """The layers inside ``model`` that :func:`apply_activation_checkpointing` checkpoints now (under
    ``"auto"``: those its current plan checkpoints)."""
    return [
        module
        for module in model.modules()
        if _WRAPPED_ATTRIBUTE in module.__dict__ and module.__dict__[_WRAPPED_ATTRIBUTE].mode is not None
    ]


def layer_checkpointing(layer: nn.Module) -> Optional[LayerCheckpointing]:
    """How ``layer`` is checkpointed now: ``"recompute"``, ``"offload"``, or None (not wrapped by
    :func:`apply_activation_checkpointing`, or not checkpointed by the current plan of ``"auto"``)."""
    wrapping = layer.__dict__.get(_WRAPPED_ATTRIBUTE)
    return None if wrapping is None else wrapping.mode


def checkpoint_planner_of(model: nn.Module) -> AutoCheckpointing | None:
    """The :class:`AutoCheckpointing` planner of the layers inside ``model`` (``checkpointing="auto"``), or None."""
    wrappings = (module.__dict__.get(_WRAPPED_ATTRIBUTE) for module in model.modules())
    return next((wrapping.planner for wrapping in wrappings if wrapping and wrapping.planner), None)


def remove_activation_checkpointing(model: nn.Module) -> int:
    """Restore the forward of every layer wrapped by :func:`apply_activation_checkpointing`."""
    return sum(_unwrap(module) for module in model.modules())


def _unwrap(layer: nn.Module) -> bool:
    if _WRAPPED_ATTRIBUTE not in layer.__dict__:
        return False
    inner_forward = layer.__dict__.pop(_WRAPPED_ATTRIBUTE).inner_forward
    if inner_forward is None:
        del layer.__dict__["forward"]
    else:
        layer.__dict__["forward"] = inner_forward
    return True


def hf_gradient_checkpointing_on(model: nn.Module) -> bool:
    """Whether HF's own gradient checkpointing is on anywhere inside ``model``."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def disable_hf_gradient_checkpointing(model: nn.Module) -> None:
    """Turn HF's gradient checkpointing off on every HF model inside ``model``."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and hf_gradient_checkpointing_on(module):
            # transformers >= 5.20 renamed it (the old name warns)
            disable = getattr(module, "activation_checkpointing_disable", None) or module.gradient_checkpointing_disable
            disable()


def without_cache(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Drop KV caches: a training step has no use for them and a recompute would update them twice."""
    args = tuple(None if isinstance(value, Cache) else value for value in args)
    kwargs = {name: None if isinstance(value, Cache) else value for name, value in kwargs.items()}
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    return args, kwargs


def _trainable_parameters(layer: nn.Module) -> list[nn.Parameter]:
    return [parameter for parameter in layer.parameters() if parameter.requires_grad]


def _needs_grad(parameters: list[nn.Parameter], hidden_states: Tensor, other_inputs: list[Tensor]) -> bool:
    return bool(parameters) or hidden_states.requires_grad or any(t.requires_grad for t in other_inputs)


def _offload_forward(
    layer: nn.Module, run_layer: Callable, offloader: HostOffloader, slot: int, *args: Any, **kwargs: Any
) -> Any:
    global _warned_cpu_fallback
    if not torch.is_grad_enabled():
        return run_layer(*args, **kwargs)
    args, kwargs = without_cache(args, kwargs)
    hidden_states = args[0] if args else kwargs["hidden_states"]
    leaves, spec = pytree.tree_flatten((args, kwargs))
    hidden_index = next(i for i, leaf in enumerate(leaves) if leaf is hidden_states)
    other_positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and i != hidden_index]
    other_inputs = [leaves[i] for i in other_positions]
    parameters = _trainable_parameters(layer)
    if not _needs_grad(parameters, hidden_states, other_inputs):
        return run_layer(*args, **kwargs)
    if not hidden_states.is_cuda and not offloader.runs_on_cpu:
        if not _warned_cpu_fallback:
            _warned_cpu_fallback = True
            warnings.warn(
                "lightning_fastft: activation offload needs CUDA tensors; layers on "
                f"{hidden_states.device.type} use plain recompute checkpointing instead.",
                stacklevel=3,
            )
        offloader = _KEEP_ON_DEVICE
    call = _LayerCall(
        run_layer=run_layer,
        input_spec=spec,
        input_leaves=[_TENSOR_SLOT if isinstance(leaf, Tensor) else leaf for leaf in leaves],
        hidden_index=hidden_index,
        other_positions=other_positions,
        parameters=parameters,
        offloader=offloader,
        slot=slot,
    )
    output_tensors = _OffloadedLayer.apply(call, hidden_states, *other_inputs, *parameters)
    layer_outputs = sum(leaf is _TENSOR_SLOT for leaf in call.output_leaves)
    for tensor in output_tensors[layer_outputs:]:  # on to a collection around this call (a CUDA graph's)
        keep_differentiable(tensor)
    return call.rebuild_output(output_tensors)


class AutoCheckpointing:
    """The planner of ``checkpointing="auto"`` for the decoder ``stacks`` inside ``model``.

    Every layer's instance forward goes through the planner. A call with grad enabled that brings its
    stack more tokens than the stack was last measured with (or is the stack's first) measures the
    stack's saved bytes per layer: the layer's plain forward runs once more on the same inputs
    (:func:`~lightning_fastft.training.memory_plan.saved_activation_bytes`, the RNG state forked so
    the real call draws the same numbers). Then all stacks are planned again
    (:func:`~lightning_fastft.training.memory_plan.plan_checkpointing`; the plan is logged, and kept
    in :attr:`plan`) and the call runs in its layer's planned mode. Layers run their plain forward
    before the first plan and in stacks never run with grad. Only a call that needs a gradient plans.

    The budget (``memory_budget_gib`` or
    :func:`~lightning_fastft.training.memory_plan.default_memory_budget`) and the model state
    (:func:`~lightning_fastft.training.memory_plan.model_state_bytes`) are read at the first plan
    and kept. Offload is planned on CUDA devices, and on the CPU with an emulating ``offloader``;
    under ``cuda_graphs`` (:mod:`~lightning_fastft.training.cuda_graphs`), where an offloaded layer
    runs without its graphs, only when no plan without offload fits the budget.
    """

    def __init__(
        self,
        model: nn.Module,
        stacks: list[nn.ModuleList],
        memory_budget_gib: float | None,
        offloader: HostOffloader,
    ):
        self.model = model
        self.stacks = stacks
        self.memory_budget_gib = memory_budget_gib
        self.offloader = offloader
        self.plan: CheckpointPlan | None = None
        self.measured: list[StackMemory | None] = [None] * len(stacks)
        self.budget_bytes: int | None = None
        self._measured_tokens = [0] * len(stacks)
        self._state_bytes: int | None = None
        self._device_store = DeviceStore()
        self._run_layer = [[layer.forward for layer in stack] for stack in stacks]
        self._forwards = [list(runs) for runs in self._run_layer]  # each layer's forward under the plan
        self._slots = [[offloader.new_slot() for _ in stack] for stack in stacks]
        for s, stack in enumerate(stacks):
            for i, layer in enumerate(stack):
                inner_forward = layer.__dict__.get("forward")  # another patch's instance forward, if any
                layer.forward = partial(_auto_forward, self, s, i)
                layer.__dict__[_WRAPPED_ATTRIBUTE] = _Wrapping(None, self, inner_forward)

    def observe(self, s: int, i: int, args: tuple, kwargs: dict) -> None:
        """Measure stack ``s`` and plan again if this call of its layer ``i`` brings more tokens than measured."""
        hidden_states = args[0] if args else kwargs["hidden_states"]
        tokens = hidden_states.numel() // hidden_states.shape[-1]
        if tokens <= self._measured_tokens[s]:
            return
        layer = self.stacks[s][i]
        args, kwargs = without_cache(args, kwargs)
        others = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, Tensor)]
        others = [tensor for tensor in others if tensor is not hidden_states]
        if not _needs_grad(_trainable_parameters(layer), hidden_states, others):
            return
        device = hidden_states.device
        run_layer = self._run_layer[s][i]
        # measured as a layer whose input needs a gradient: the first layer's input (frozen embeddings)
        # needs none, every later one's does, and they save more for it (the input norm's input, ...)
        probe = hidden_states if hidden_states.requires_grad else hidden_states.detach().requires_grad_()
        if args:
            args = (probe, *args[1:])
        else:
            kwargs = {**kwargs, "hidden_states": probe}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            saved = saved_activation_bytes(
                lambda: run_layer(*args, **kwargs), exclude=[*layer.parameters(), *layer.buffers(), *others]
            )
        self.measured[s] = StackMemory(len(self.stacks[s]), saved, hidden_states.numel() * hidden_states.element_size())
        self._measured_tokens[s] = tokens
        self._plan(device, tokens)

    def _plan(self, device: torch.device, tokens: int) -> None:
        _turn_off_hf_gradient_checkpointing(self.model)
        if self._state_bytes is None:
            self._state_bytes = model_state_bytes(self.model, device)
            if self.memory_budget_gib is None:
                self.budget_bytes = default_memory_budget(device)
            else:
                self.budget_bytes = round(self.memory_budget_gib * GIB)
        measured = [s for s, memory in enumerate(self.measured) if memory is not None]
        planning = partial(
            plan_checkpointing,
            [self.measured[s] for s in measured],
            tokens=tokens,
            fixed_bytes=self._state_bytes,
            loss_workspace_bytes=loss_workspace_bytes(self.model, tokens),
            budget_bytes=self.budget_bytes,
            host_budget_bytes=self.offloader.host_budget_bytes(),
        )
        offload = device.type == "cuda" or self.offloader.runs_on_cpu
        graphed = any(GRAPHED_ATTRIBUTE in layer.__dict__ for stack in self.stacks for layer in stack)
        plan = None
        if offload and graphed:  # an offloaded layer runs without its CUDA graphs: recompute where it fits
            with contextlib.suppress(ValueError):
                plan = planning(offload=False)
        if plan is None:
            plan = planning(offload=offload)
        modes = [(None,) * len(stack) for stack in self.stacks]
        for s, stack_modes in zip(measured, plan.modes):
            modes[s] = stack_modes
        self.plan = dataclasses.replace(plan, modes=tuple(modes))
        for s, stack in enumerate(self.stacks):
            for i, (layer, mode) in enumerate(zip(stack, modes[s])):
                run_layer = self._run_layer[s][i]
                if mode is None:
                    self._forwards[s][i] = run_layer
                else:
                    store = self.offloader if mode == "offload" else self._device_store
                    self._forwards[s][i] = partial(_offload_forward, layer, run_layer, store, self._slots[s][i])
                layer.__dict__[_WRAPPED_ATTRIBUTE].mode = mode
        rank_zero_info(str(self.plan))


def _auto_forward(planner: AutoCheckpointing, s: int, i: int, *args: Any, **kwargs: Any) -> Any:
    if torch.is_grad_enabled():
        planner.observe(s, i, args, kwargs)
    return planner._forwards[s][i](*args, **kwargs)


@dataclass
class _LayerCall:
    """One call of a layer, with its tensors taken out (they are held by autograd or the host store)."""

    run_layer: Callable
    input_spec: pytree.TreeSpec
    input_leaves: list  # non-tensor leaves; _TENSOR_SLOT where a tensor goes
    hidden_index: int
    other_positions: list[int]
    parameters: list[nn.Parameter]
    offloader: HostOffloader
    slot: int
    output_spec: pytree.TreeSpec | None = None
    output_leaves: list | None = None  # non-tensor output leaves; _TENSOR_SLOT where a tensor goes

    def run(self, hidden_states: Tensor, other_inputs: list[Tensor]) -> Any:
        leaves = list(self.input_leaves)
        leaves[self.hidden_index] = hidden_states
        for position, tensor in zip(self.other_positions, other_inputs):
            leaves[position] = tensor
        args, kwargs = pytree.tree_unflatten(leaves, self.input_spec)
        return self.run_layer(*args, **kwargs)

    def rebuild_output(self, output_tensors: tuple[Tensor, ...]) -> Any:
        tensors = iter(output_tensors)
        leaves = [next(tensors) if leaf is _TENSOR_SLOT else leaf for leaf in self.output_leaves]
        return pytree.tree_unflatten(leaves, self.output_spec)


class _RngState:
    """CPU and device RNG states at forward time, restored (in a fork) for the backward recompute.
    Not the device's while a CUDA graph is being captured: graphed layers draw no random numbers
    (:mod:`~lightning_fastft.training.cuda_graphs` leaves layers with dropout eager)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_state = torch.get_rng_state()
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        self.cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" and not capturing else None

    @contextlib.contextmanager
    def restored(self):
        devices = [self.device] if self.cuda_state is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu_state)
            if self.cuda_state is not None:
                torch.cuda.set_rng_state(self.cuda_state, self.device)
            yield


class _AutocastState:
    """Autocast settings at forward time (device and CPU), re-entered for the backward recompute."""

    def __init__(self, device_type: str):
        self.settings = [
            (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
            for kind in dict.fromkeys((device_type, "cpu"))
            if torch.amp.is_autocast_available(kind)
        ]
        self.cache_enabled = torch.is_autocast_cache_enabled()

    def restored(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for kind, enabled, dtype in self.settings:
            stack.enter_context(
                torch.autocast(device_type=kind, dtype=dtype, enabled=enabled, cache_enabled=self.cache_enabled)
            )
        return stack


class _OffloadedLayer(torch.autograd.Function):
    """A decoder layer that saves only its input: in host memory until backward (offload), or on the
    device as an autograd saved tensor (recompute: :class:`DeviceStore`), freed by the backward.

    forward: y = layer(x, *others) under no_grad; x goes to the store, ``others`` (masks,
    rotary cos/sin) are saved as they are; RNG and autocast state are recorded.
    backward: x is fetched back (offload: the previous layer's input is prefetched meanwhile), the layer is
    re-run with grad under the recorded RNG/autocast state, and
    (dL/dx, dL/dothers, dL/dparams) = vjp(layer at x, dL/dy) by ``torch.autograd.grad``.
    Tensors handed to :func:`keep_differentiable` during the call are extra outputs (y includes them).
    The trainable parameters are explicit inputs, so their grads flow even when no input requires
    grad (LoRA over frozen embeddings) and reach DDP's gradient hooks like any other grad.
    """

    @staticmethod
    def forward(ctx, call: _LayerCall, hidden_states: Tensor, *inputs: Tensor):
        other_inputs = inputs[: len(call.other_positions)]
        ctx.call = call
        ctx.rng = _RngState(hidden_states.device)
        ctx.autocast = _AutocastState(hidden_states.device.type)
        ctx.stored_input = call.offloader.offload(hidden_states, call.slot)
        # kept on the device: saved by autograd, which frees it after the backward (an attribute of
        # ctx would live on as long as the graph does: a loss tensor kept past backward held them all)
        ctx.save_for_backward(*([hidden_states] if ctx.stored_input is None else []), *other_inputs)
        with collecting_side_outputs() as side_outputs:
            output = call.run(hidden_states, list(other_inputs))
        leaves, call.output_spec = pytree.tree_flatten(output)
        call.output_leaves = [_TENSOR_SLOT if isinstance(leaf, Tensor) else leaf for leaf in leaves]
        return (*(leaf for leaf in leaves if isinstance(leaf, Tensor)), *side_outputs)

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor | None):
        call: _LayerCall = ctx.call
        needs_grad = ctx.needs_input_grad[1:]  # hidden states, other inputs, parameters
        saved = list(ctx.saved_tensors)
        stored = saved.pop(0) if ctx.stored_input is None else call.offloader.fetch(ctx.stored_input)
        hidden_states = stored.detach().requires_grad_(needs_grad[0])
        other_inputs = [
            tensor.detach().requires_grad_(needs)
            for tensor, needs in zip(saved, needs_grad[1 : 1 + len(call.other_positions)])
        ]
        with torch.enable_grad(), ctx.rng.restored(), ctx.autocast.restored(), _recompute(), collecting_side_outputs() as side:
            output = call.run(hidden_states, other_inputs)
        output_tensors = [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, Tensor)] + side
        differentiable = [
            (tensor, grad)
            for tensor, grad in zip(output_tensors, grad_outputs)
            if tensor.requires_grad and grad is not None
        ]
        inputs = [hidden_states, *other_inputs, *call.parameters]
        wanted = [tensor for tensor, needs in zip(inputs, needs_grad) if needs]
        if differentiable:
            grads = torch.autograd.grad(
                [tensor for tensor, _ in differentiable],
                wanted,
                [grad for _, grad in differentiable],
                allow_unused=True,
            )
        else:
            grads = [None] * len(wanted)
        grads = iter(grads)
        return (None, *(next(grads) if needs else None for needs in needs_grad))


class _HostCopy:
    """A tensor waiting in host memory as ``pieces`` (consecutive runs of its flattened elements);
    the buffer returns to the pool once it is copied back."""

    def __init__(self, pieces: list[Tensor], shape: torch.Size, device: torch.device, return_buffer: Callable[[], None]):
        self.pieces = pieces
        self.shape = shape
        self.device = device
        # runs once: on fetch, or when the autograd graph holding this copy is freed unused
        self.release = weakref.finalize(self, return_buffer)
        self.previous: weakref.ref[_HostCopy] | None = None
        self.device_copy: Tensor | None = None
        self.copied_back: torch.cuda.Event | None = None

    @property
    def released(self) -> bool:
        return not self.release.alive


class DeviceStore:
    """The store of ``checkpointing="recompute"``: layer inputs stay on their device, nothing is copied
    (``offload`` returns None: the layer saves its input for backward as autograd does)."""

    runs_on_cpu = True

    def new_slot(self) -> int:
        return 0

    def offload(self, tensor: Tensor, slot: int) -> None:
        return None


_KEEP_ON_DEVICE = DeviceStore()  # the CPU fallback of checkpointing="offload"


def _empty_host_cache() -> None:
    """Free the pinned host memory torch caches and no tensor uses (``torch.accelerator.empty_host_cache``
    from torch 2.13; the same call under its private name before)."""
    empty = getattr(torch.accelerator, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


def _spans(buffer: list[Tensor], numel: int):
    """``(piece, start, stop)``: the pieces of ``buffer`` that hold elements ``[start, stop)`` of ``numel``."""
    start = 0
    for piece in buffer:
        if start >= numel:
            return
        stop = min(numel, start + piece.numel())
        yield piece, start, stop
        start = stop


def _gather(stored: _HostCopy, non_blocking: bool) -> Tensor:
    """``stored``'s pieces copied into one new tensor of its shape on its device."""
    tensor = torch.empty(stored.shape, dtype=stored.pieces[0].dtype, device=stored.device)
    flat = tensor.view(-1)
    for piece, start, stop in _spans(stored.pieces, flat.numel()):
        flat[start:stop].copy_(piece, non_blocking=non_blocking)
    return tensor


class HostOffloader:
    """Moves layer inputs to pinned host memory and back, overlapping the copies with compute.

    Device -> host copies run on a side stream after the layer input is produced; the compute
    stream never waits for them. A backward ``fetch`` of layer ``i`` waits only for the
    host -> device copy of its own input, and starts the copy of the input stored just before it
    (the next layer to be recomputed). Host buffers come from a pool keyed by (layer slot, dtype)
    and grow to the largest shape seen, so steady-state steps allocate no pinned memory; a buffer
    is handed out again only after its input was fetched (or its graph freed), so several forwards
    before one backward are safe. A buffer is a list of pinned pieces whose byte sizes are powers
    of two of at least ``piece_bytes`` (:func:`host_piece_sizes`): torch's pinned-memory allocator
    rounds every allocation up to a power of two, which would reserve up to twice the host memory
    the inputs need (4 GiB for each 2.8 GB layer input of an 8B model at 344k tokens).
    ``emulate_on_cpu=True`` runs the same logic on CPU tensors with
    synchronous copies into ordinary host buffers (tests); CUDA tensors always take the stream path.
    """

    piece_bytes = HOST_PIECE_BYTES  # per instance: tests make it small to split tiny inputs

    def __init__(self, emulate_on_cpu: bool = False):
        self.runs_on_cpu = emulate_on_cpu
        self.host_buffers_allocated = 0
        self._free_buffers: dict[tuple[int, torch.dtype], list[list[Tensor]]] = {}
        self._slots = itertools.count()
        self._latest: weakref.ref[_HostCopy] | None = None
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}

    def new_slot(self) -> int:
        return next(self._slots)

    def offload(self, tensor: Tensor, slot: int) -> _HostCopy:
        key = (slot, tensor.dtype)
        buffer = self._take_buffer(key, tensor.numel(), pin=tensor.is_cuda)
        flat = tensor.reshape(-1)
        copies = [(piece[: stop - start], flat[start:stop]) for piece, start, stop in _spans(buffer, tensor.numel())]
        if tensor.is_cuda:
            side_stream = self._side_stream(tensor.device)
            side_stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(side_stream):
                for piece, source in copies:
                    piece.copy_(source, non_blocking=True)
            flat.record_stream(side_stream)  # its memory is not reused before the copies are done
        else:
            for piece, source in copies:
                piece.copy_(source)
        pieces = [piece for piece, _ in copies]
        stored = _HostCopy(pieces, tensor.shape, tensor.device, partial(self._return_buffer, key, buffer))
        stored.previous = self._latest
        self._latest = weakref.ref(stored)
        return stored

    def prefetch(self, stored: _HostCopy) -> None:
        """Start copying ``stored`` back to its device (on the side stream for CUDA)."""
        if stored.device_copy is not None or stored.released:
            return
        if stored.device.type == "cuda":
            side_stream = self._side_stream(stored.device)
            with torch.cuda.stream(side_stream):  # queued after the device -> host copy
                stored.device_copy = _gather(stored, non_blocking=True)
                stored.copied_back = torch.cuda.Event()
                stored.copied_back.record(side_stream)
        else:
            stored.device_copy = _gather(stored, non_blocking=False)

    def fetch(self, stored: _HostCopy) -> Tensor:
        """The tensor back on its device, ready for the current stream; prefetches the one before."""
        if stored.released:
            raise RuntimeError(
                "lightning_fastft: this offloaded layer input was already used by a backward pass; "
                'backward through the same graph twice (retain_graph=True) is not supported with '
                'checkpointing="offload"; use checkpointing="recompute".'
            )
        self.prefetch(stored)
        tensor, stored.device_copy = stored.device_copy, None
        if stored.copied_back is not None:
            compute_stream = torch.cuda.current_stream(stored.device)
            compute_stream.wait_event(stored.copied_back)
            tensor.record_stream(compute_stream)
        stored.release()  # later copies into the buffer queue behind the copy back on the side stream
        previous = stored.previous() if stored.previous is not None else None
        if previous is not None:
            self.prefetch(previous)
        return tensor

    def _take_buffer(self, key: tuple[int, torch.dtype], numel: int, pin: bool) -> list[Tensor]:
        free = self._free_buffers.setdefault(key, [])
        for index, buffer in enumerate(free):
            if sum(piece.numel() for piece in buffer) >= numel:
                return free.pop(index)
        if free:  # a larger shape arrived: drop a smaller buffer so the pool stays small, and give
            free.pop()  # its pinned memory back (torch's pinned-memory cache would keep it)
            if pin:
                _empty_host_cache()
        element_size = torch.empty((), dtype=key[1]).element_size()
        sizes = host_piece_sizes(numel, element_size, self.piece_bytes)
        needed, available = sum(sizes) * element_size, host_memory_available()
        if available is not None and needed > available - HOST_MARGIN_BYTES:
            raise MemoryError(
                f"lightning_fastft: checkpointing='offload' needs {needed / GIB:.2f} GiB more host memory for a "
                f"layer input but only {available / GIB:.2f} GiB is available ({HOST_MARGIN_BYTES / GIB:.0f} GiB "
                "kept free); the offloaded inputs of all layers live in host memory at once. Use "
                "checkpointing='auto' (it offloads only what the host holds), 'recompute', or shorter sequences."
            )
        self.host_buffers_allocated += 1
        return [torch.empty(size, dtype=key[1], pin_memory=pin) for size in sizes]

    def host_budget_bytes(self) -> int | None:
        """Host memory offloaded inputs may take: what the system has available plus the pooled
        buffers, less :data:`HOST_MARGIN_BYTES` (``None`` where the system does not say)."""
        available = host_memory_available()
        if available is None:
            return None
        pooled = sum(piece.nbytes for buffers in self._free_buffers.values() for buffer in buffers for piece in buffer)
        return available + pooled - HOST_MARGIN_BYTES

    def _return_buffer(self, key: tuple[int, torch.dtype], buffer: list[Tensor]) -> None:
        self._free_buffers.setdefault(key, []).append(buffer)

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._side_streams:
            self._side_streams[device] = torch.cuda.Stream(device)
        return self._side_streams[device]
