"""CUDA graphs of the decoder layers' training forward and backward (``cuda_graphs=True``).

At batch 1 a LoRA step of an 8B model is bound by the host, not the GPU: every decoder layer
launches dozens of kernels in forward, again in the backward recompute and in backward, and each
launch costs the host tens of microseconds of Python, autograd and dispatch. With ``cuda_graphs``
each decoder layer's training forward and backward (with ``checkpointing="recompute"``: the
recompute inside the backward) is captured once as a pair of CUDA graphs and replayed afterwards,
two launches per layer. The capture is :func:`torch.cuda.make_graphed_callables`, all layers of a
stack in one call so that their graphs share one memory pool in the order they run: the memory of
the step stays what the checkpointing plan makes it.

When a layer call replays its graph, and when it runs its own forward ("eagerly"):

* Only training calls are graphed: grad enabled, the layer in train mode, CUDA tensors, no dropout
  active in the layer (a replayed recompute could not redraw the forward's random mask), the layer
  not offloaded by the plan of ``checkpointing="auto"`` (host copies on a side stream), and no
  Hugging Face output recorded from inside the layers but the router logits (``output_attentions``):
  a replay runs no module hooks, so such a forward runs eagerly, with a warning once. Router logits
  (``output_router_logits=True``, the load-balancing loss) are outputs of the graphs instead: each
  replay hands its layer's logits to Hugging Face's recording, with their gradient.
* A stack is captured at the start of a forward in which every layer's call has the signature
  (tensor shapes, dtypes, ``requires_grad``, the non-tensor arguments, autocast) it had in the
  previous training forward: fixed shapes, as fixed-length packing or padding gives. The first
  training forward runs eagerly (kernels compile and autotune there). A forward whose signature
  differs runs eagerly; if its signature repeats, the stack is captured again and the old graphs
  are dropped. After :data:`MAX_CAPTURES` captures of one stack it stays eager, with a warning.
* A layer whose last graphed forward still waits for its backward (two forwards before one
  backward) runs eagerly: a replay would overwrite what that backward needs.
* A layer whose parameters or buffers moved since the capture (``model.to``, ``param.data = ...``)
  drops its stack's graphs; the stack is captured again.
* A capture that fails (an operation CUDA graphs cannot capture, such as a host synchronisation
  inside the layer) warns once with the error, and that stack stays eager.

Gradients: a graph writes the parameter gradients into buffers that its next replay overwrites.
They become the parameters' ``.grad`` without a copy (:class:`_GraphGradients`); the stack's next
training forward first copies any ``.grad`` still held there, so accumulation over micro-batches
stays exact. A reference to a ``.grad`` taken before ``zero_grad`` is the graph's buffer, as a layer
output is. Outputs of a graphed layer are the graph's buffers too: a layer output kept past the next
step (``output_hidden_states`` stored across steps) is overwritten by the next replay.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import warnings
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from lightning_fastft._hf import hf_output_recording_paused, hf_record, hf_recorded_outputs
from lightning_fastft.training.checkpointing import (
    GRAPHED_ATTRIBUTE,
    collecting_side_outputs,
    keep_router_logits,
    find_decoder_layer_lists,
    layer_checkpointing,
    without_cache,
)

MAX_CAPTURES = 8
"""Captures of one decoder stack before it stays eager (its call signature keeps changing)."""

_TENSOR = object()  # stands for a tensor among a call's leaves
_warned_no_cuda = False
_warned_recorded = False


class _GraphGradients(torch.autograd.Function):
    """Identity on a layer's trainable parameters whose backward hands autograd the graph's own
    parameter-gradient buffers, noting each one's address in ``held`` (by parameter). Autograd's
    AccumulateGrad keeps a gradient that nothing else references as ``.grad`` itself: after a
    replay a parameter's ``.grad`` is the graph's buffer, with no copy. The stack's graphs share one
    memory pool, so any of its replays may overwrite that buffer: before the stack's next forward
    its first layer's call copies every ``.grad`` still held there (:meth:`StackGraphs.call`).
    Accumulation over micro-batches stays exact, and a step without accumulation copies nothing."""

    @staticmethod
    def forward(ctx, held: dict, *parameters: Tensor) -> tuple[Tensor, ...]:
        ctx.held, ctx.parameters = held, parameters
        return tuple(parameter.view_as(parameter) for parameter in parameters)

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        ctx.held.update((p, grad.data_ptr()) for p, grad in zip(ctx.parameters, grads) if grad is not None)
        return (None, *grads)


def _unshare_gradients(held: dict) -> None:
    """Each ``.grad`` that is still the graph buffer ``held`` notes for its parameter replaced by a
    copy of it; ``held`` emptied."""
    for parameter, pointer in held.items():
        if parameter.grad is not None and parameter.grad.data_ptr() == pointer:
            parameter.grad = parameter.grad.clone()
    held.clear()


def call_signature(args: tuple, kwargs: dict) -> Optional[tuple[tuple, list[Tensor]]]:
    """``(key, tensors)`` of a layer call: the key holds what a captured graph depends on (the call's
    structure, its non-tensor arguments, every tensor's shape, dtype, device and ``requires_grad``,
    the autocast state); None when a non-tensor argument is unhashable (such a call is not graphed)."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
    constants = tuple(_TENSOR if isinstance(leaf, Tensor) else leaf for leaf in leaves)
    shapes = tuple((tuple(t.shape), t.dtype, t.device, t.requires_grad) for t in tensors)
    autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    key = (spec, constants, shapes, autocast)
    try:
        hash(key)
    except TypeError:
        return None
    return key, tensors


def _not_graphed(layer: nn.Module) -> Optional[str]:
    """Why ``layer`` cannot be captured now (active dropout, offloaded input), or None."""
    if layer_checkpointing(layer) == "offload":
        return "its input is offloaded to the host (checkpointing='auto' planned so)"
    dropout = _active_dropout(layer)
    return None if dropout is None else f"dropout is active in it ({dropout}; set dropout to 0 to graph it)"


def _active_dropout(layer: nn.Module) -> Optional[str]:
    """The first dropout in ``layer`` that draws random numbers in training, by name; or None."""
    for name, module in layer.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"{name or 'layer'} (p={module.p})"
        probability = getattr(module, "attention_dropout", 0.0)
        if isinstance(probability, float) and probability > 0:
            return f"{name or 'layer'}.attention_dropout={probability}"
    return None


def _pointers(layer: nn.Module) -> tuple[int, ...]:
    return tuple(tensor.data_ptr() for tensor in itertools.chain(layer.parameters(), layer.buffers()))


@dataclass
class _Sample:
    """One eager training call of a layer, kept to capture it from: its key and copies of its tensors,
    but the hidden state's (the capture fills one of its shape with random numbers)."""

    key: tuple
    tensors: list[Optional[Tensor]]  # None at the hidden state

    @classmethod
    def of(cls, key: tuple, tensors: list[Tensor], hidden_states: Tensor) -> "_Sample":
        return cls(key, [None if t is hidden_states else t.detach().clone() for t in tensors])

    def capture_arguments(self, parameters: list[nn.Parameter]) -> tuple[Tensor, ...]:
        tensors = [
            torch.randn(shape, dtype=dtype, device=device) if tensor is None else tensor
            for tensor, (shape, dtype, device, _) in zip(self.tensors, self.key[2])
        ]
        tensors = [tensor.requires_grad_(requires_grad) for tensor, (*_, requires_grad) in zip(tensors, self.key[2])]
        return (*tensors, *parameters)


@dataclass
class _Graphs:
    """The captured graphs of one stack: per layer the key it was captured for, its graphed function
    (None: that layer was not captured) and the addresses of its weights at capture."""

    keys: list[Optional[tuple]]
    functions: list[Optional[Callable]]
    pointers: list[tuple[int, ...]]


@dataclass
class StackGraphs:
    """The CUDA graph state of one decoder stack (:func:`cuda_graphs_of` lists them).

    ``captures``: how often the stack was captured; ``replays``: layer calls that replayed a graph;
    ``eager_reason``: why the stack stays eager for good (None while it may capture).
    """

    layers: list[nn.Module]
    forwards: list[Callable]  # each layer's forward under the graph wrapping
    captures: int = 0
    replays: int = 0
    eager_reason: Optional[str] = None
    graphs: Optional[_Graphs] = None
    samples: list[Optional[_Sample]] = field(default_factory=list)
    pending: list[Optional[weakref.ref]] = field(default_factory=list)
    held_gradients: dict = field(default_factory=dict)  # parameter -> address of its graph's gradient buffer

    def __post_init__(self) -> None:
        self.samples = [None] * len(self.layers)
        self.pending = [None] * len(self.layers)

    def call(self, i: int, *args: Any, **kwargs: Any) -> Any:
        """Layer ``i``'s call: its graph replayed when one fits the call, else its own forward."""
        layer = self.layers[i]
        if not (torch.is_grad_enabled() and layer.training) or self.eager_reason is not None:
            return self.forwards[i](*args, **kwargs)
        if i == 0:  # the replays to come may overwrite the graphs' gradient buffers: no .grad left there
            _unshare_gradients(self.held_gradients)
        args, kwargs = without_cache(args, kwargs)
        signature = call_signature(args, kwargs)
        if signature is None:
            self._stay_eager("a layer call has a non-tensor argument that is not hashable")
            return self.forwards[i](*args, **kwargs)
        key, tensors = signature
        hidden_states = args[0] if args else kwargs["hidden_states"]
        if not hidden_states.is_cuda:
            _warn_no_cuda(hidden_states.device)
            return self.forwards[i](*args, **kwargs)
        # hidden states: recorded by the layer's own hook, which runs; router logits: outputs of the graphs
        recorded = [name for name in hf_recorded_outputs() if name not in ("hidden_states", "router_logits")]
        if recorded:
            _warn_recorded(recorded)
            return self.forwards[i](*args, **kwargs)
        if i == 0 and self._repeats(key):
            self._capture()
        graphed = self._graphed(i, key)
        if graphed is None:
            self.samples[i] = _Sample.of(key, tensors, hidden_states)
            return self.forwards[i](*args, **kwargs)
        parameters = _trainable(layer)
        routed = _GraphGradients.apply(self.held_gradients, *parameters) if parameters else ()
        output, router_logits = graphed(*tensors, *routed)
        hf_record("router_logits", router_logits)
        self.replays += 1
        nodes = (leaf.grad_fn for leaf in pytree.tree_leaves(output) if isinstance(leaf, Tensor))
        node = next((node for node in nodes if node is not None), None)
        if node is not None:
            self.pending[i] = weakref.ref(node)
            node.register_hook(partial(_backward_done, weakref.ref(self), i))
        return output

    def __deepcopy__(self, memo: dict) -> "StackGraphs":
        """A copy of the layers wrapped the same way, without graphs (they hold the original's memory)."""
        clone = memo[id(self)] = StackGraphs.__new__(StackGraphs)  # the layers' forwards refer back to it
        clone.__init__(copy.deepcopy(self.layers, memo), copy.deepcopy(self.forwards, memo))
        return clone

    def _repeats(self, key: tuple) -> bool:
        """Whether the forward starting now repeats the previous one's signature, with no graph for it yet."""
        if self.graphs is not None and self.graphs.keys[0] == key:
            return False
        return all(sample is not None for sample in self.samples) and self.samples[0].key == key

    def _graphed(self, i: int, key: tuple) -> Optional[Callable]:
        graphs = self.graphs
        if graphs is None or graphs.keys[i] != key or graphs.functions[i] is None:
            return None
        if graphs.pointers[i] != _pointers(self.layers[i]):  # weights moved: the graphs read stale memory
            self.graphs = None
            return None
        pending = self.pending[i]
        if pending is not None and pending() is not None:  # its last replay still waits for backward
            return None
        return graphs.functions[i]

    def _capture(self) -> None:
        self.graphs = None  # the old graphs' pool goes with them
        if self.captures == MAX_CAPTURES:
            self._stay_eager(f"its call signature changed {MAX_CAPTURES} times; CUDA graphs need fixed shapes")
            return
        self.captures += 1
        samples, self.samples = self.samples, [None] * len(self.layers)
        reasons = [_not_graphed(layer) for layer in self.layers]
        chosen = [i for i, reason in enumerate(reasons) if reason is None]
        left_out = [(i, reason) for i, reason in enumerate(reasons) if reason is not None]
        if left_out:
            warnings.warn(
                f"lightning_fastft: cuda_graphs: {len(left_out)} of {len(self.layers)} decoder layers run without "
                f"CUDA graphs; layer {left_out[0][0]}: {left_out[0][1]}.",
                stacklevel=4,
            )
        if not chosen:
            self._stay_eager(f"no layer can be captured (layer 0: {reasons[0]})")
            return
        aliases = [_aliases(self.layers[i]) for i in chosen]
        functions = tuple(_layer_function(self.forwards[i], samples[i].key) for i in chosen)
        arguments = tuple(samples[i].capture_arguments(list(a.values())) for i, a in zip(chosen, aliases))
        # Garbage collected during a capture (an old graph, a pinned buffer, a CUDA event of an earlier
        # model) frees device resources, which a capturing stream does not allow: collect first, and
        # not during it (torch did the same before its captures until 2.9).
        stream, collecting = torch.cuda.current_stream(), gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            with _autocast_cache_off(), _swapped(self.layers, chosen, aliases), hf_output_recording_paused(), _quiet():
                graphed = torch.cuda.make_graphed_callables(functions, arguments, allow_unused_input=True)
        except Exception as error:  # noqa: BLE001 - any capture failure leaves the stack eager, named
            torch.cuda.set_stream(stream)  # a capture that failed at its end leaves its side stream current
            self._stay_eager(f"its capture failed: {type(error).__name__}: {error}")
            torch.cuda.synchronize()
            return
        finally:
            if collecting:
                gc.enable()
        keys: list[Optional[tuple]] = [None] * len(self.layers)
        functions_by_layer: list[Optional[Callable]] = [None] * len(self.layers)
        for i, function in zip(chosen, graphed):
            keys[i], functions_by_layer[i] = samples[i].key, function
        self.graphs = _Graphs(keys, functions_by_layer, [_pointers(layer) for layer in self.layers])
        torch.cuda.empty_cache()  # the eager steps' cached blocks; the graphs have their own pool

    def _stay_eager(self, reason: str) -> None:
        self.eager_reason = reason
        self.graphs = None
        warnings.warn(f"lightning_fastft: cuda_graphs: a decoder stack stays eager: {reason}", stacklevel=5)


def _backward_done(stack: weakref.ref, i: int, *_: Any) -> None:
    graphs = stack()
    if graphs is not None:
        graphs.pending[i] = None


def _trainable(layer: nn.Module) -> list[nn.Parameter]:
    return [parameter for parameter in layer.parameters() if parameter.requires_grad]


def _aliases(layer: nn.Module) -> dict[str, nn.Parameter]:
    """New trainable parameters sharing the storage of ``layer``'s, by name: the capture differentiates
    for these. The real parameters' gradient accumulators may be held by an earlier step's graph (or
    DDP) with the stream they were created on; differentiating for them inside a capture would make
    the capture wait on that stream, which invalidates it when it is the default stream."""
    return {name: nn.Parameter(p.detach(), requires_grad=True) for name, p in layer.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def _swapped(layers: list[nn.Module], chosen: list[int], aliases: list[dict[str, nn.Parameter]]):
    """The chosen layers run with their trainable parameters replaced by ``aliases`` (restored after)."""
    slots = []
    for i, named in zip(chosen, aliases):
        for name, alias in named.items():
            module_name, _, attribute = name.rpartition(".")
            module = layers[i].get_submodule(module_name)
            slots.append((module, attribute, module._parameters[attribute]))
            module._parameters[attribute] = alias
    try:
        yield
    finally:
        for module, attribute, parameter in slots:
            module._parameters[attribute] = parameter


def _layer_function(forward: Callable, key: tuple) -> Callable:
    """``forward`` taking the call's tensors, then the layer's trainable parameters (not read here:
    they are passed so that the capture differentiates for them), as the graphed function does;
    returns the layer's output and the router logits made inside (:func:`keep_differentiable`)."""
    spec, constants, shapes, _ = key

    def run(*tensors: Tensor) -> tuple[Any, tuple[Tensor, ...]]:
        call_tensors = iter(tensors[: len(shapes)])
        leaves = [next(call_tensors) if leaf is _TENSOR else leaf for leaf in constants]
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        with collecting_side_outputs() as router_logits:
            output = forward(*args, **kwargs)
        return output, tuple(router_logits)

    return run


@contextlib.contextmanager
def _quiet():
    """Without torch's warning that an AccumulateGrad node runs on another stream than its producer:
    inside the capture that is the aliases' (created in the warm-up on its side stream), which is
    harmless; the warning is about the default stream, which :func:`_aliases` keeps out."""
    enabled = torch._C._warn_on_accumulate_grad_stream_mismatch()
    torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)
    try:
        yield
    finally:
        torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(enabled)


@contextlib.contextmanager
def _autocast_cache_off():
    """make_graphed_callables refuses autocast's weight-cast cache; the graphs cast as they replay."""
    enabled = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(enabled)


def _warn_recorded(recorded: list[str]) -> None:
    global _warned_recorded
    if not _warned_recorded:
        _warned_recorded = True
        warnings.warn(
            f"lightning_fastft: cuda_graphs: Hugging Face records {', '.join(recorded)} from inside the decoder "
            "layers in this forward (e.g. output_router_logits=True); a graph replay runs no module hooks, so "
            "such forwards run without CUDA graphs.",
            stacklevel=4,
        )


def _warn_no_cuda(device: torch.device) -> None:
    global _warned_no_cuda
    if not _warned_no_cuda:
        _warned_no_cuda = True
        warnings.warn(
            f"lightning_fastft: cuda_graphs needs CUDA tensors; layers on {device.type} run "
            "without CUDA graphs.",
            stacklevel=4,
        )


@dataclass
class _GraphedLayer:
    """What :func:`apply_cuda_graphs` did to one layer: its stack's state and the instance forward it
    replaced (None: the class's)."""

    stack: StackGraphs
    inner_forward: Optional[Callable]


def apply_cuda_graphs(model: nn.Module) -> list[StackGraphs]:
    """Replay the decoder layers of every HF model inside ``model`` from CUDA graphs in training
    (see the module docstring for when); returns one :class:`StackGraphs` per decoder stack.

    Apply it after activation checkpointing (``patch_model`` does): the graphs capture the layers'
    forwards as they are then, recompute included. Offloading layer inputs to the host copies on a
    side stream and waits on the host, which a graph cannot hold: ``checkpointing="offload"`` raises
    ``ValueError`` here (under ``"auto"`` the layers its plan offloads run eagerly). Applying again
    starts afresh.
    """
    stacks = find_decoder_layer_lists(model)
    if not stacks:
        raise ValueError(f"no decoder-layer ModuleList found inside {type(model).__name__}")
    remove_cuda_graphs(model)
    keep_router_logits(model)  # their gate hooks hand the router logits to the graphs as outputs
    if any(layer_checkpointing(layer) == "offload" for layer in model.modules()):
        raise ValueError(
            "cuda_graphs=True cannot capture layers checkpointed with 'offload' (host copies on a side stream); "
            "use checkpointing='recompute', 'auto' or None with cuda_graphs"
        )
    states = []
    for stack in stacks:
        state = StackGraphs(list(stack), [layer.forward for layer in stack])
        for i, layer in enumerate(stack):
            inner_forward = layer.__dict__.get("forward")
            layer.forward = partial(state.call, i)
            layer.__dict__[GRAPHED_ATTRIBUTE] = _GraphedLayer(state, inner_forward)
        states.append(state)
    return states


def cuda_graphs_of(model: nn.Module) -> list[StackGraphs]:
    """The :class:`StackGraphs` of the decoder stacks inside ``model`` (empty without ``cuda_graphs``)."""
    states = (module.__dict__[GRAPHED_ATTRIBUTE].stack for module in model.modules() if GRAPHED_ATTRIBUTE in module.__dict__)
    return list({id(state): state for state in states}.values())


def remove_cuda_graphs(model: nn.Module) -> int:
    """Restore the forward of every layer :func:`apply_cuda_graphs` wrapped (its graphs are dropped)."""
    count = 0
    for module in model.modules():
        wrapping = module.__dict__.pop(GRAPHED_ATTRIBUTE, None)
        if wrapping is None:
            continue
        wrapping.stack.graphs = None
        if wrapping.inner_forward is None:
            del module.__dict__["forward"]
        else:
            module.__dict__["forward"] = wrapping.inner_forward
        count += 1
    return count
