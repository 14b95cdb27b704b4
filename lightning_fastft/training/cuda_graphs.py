"""CUDA graphs of the decoder layers' training forward and backward (``cuda_graphs=True``).

At batch 1 a LoRA step of an 8B model is bound by the host, not the GPU: every decoder layer
launches dozens of kernels in forward, again in the backward recompute and in backward, and each
launch costs the host tens of microseconds of Python, autograd and dispatch. With ``cuda_graphs``
each decoder layer's training forward and backward (with ``checkpointing="recompute"``: the
recompute inside the backward) is captured once as a pair of CUDA graphs and replayed afterwards,
two launches per layer. All layers of a stack are captured together (:func:`_capture_stack`), their
graphs in one memory pool in the order they run, and consecutive layers share their static buffers:
a layer's output buffer is the next layer's input buffer (no copy, and what a checkpointed layer
keeps for its backward is kept once), and the hidden state's gradient passes between layers through
two buffers taken in turn. The memory of the step stays what the checkpointing plan makes it.

When a layer call replays its graph, and when it runs its own forward ("eagerly"):

* Only training calls are graphed: grad enabled, the layer in train mode, CUDA tensors, no dropout
  active in the layer (a replayed recompute could not redraw the forward's random mask), the layer
  not offloaded by the plan of ``checkpointing="auto"`` (host copies on a side stream; under graphs
  that plan offloads only where no plan without offload fits its budget), and no
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
  backward) runs eagerly: a replay would overwrite what that backward needs. So does a layer whose
  input buffer is the previous layer's output buffer when its hidden state is another tensor (the
  previous layer ran eagerly, or the model changed its output on the way): a copy would overwrite it.
* A layer whose parameters or buffers moved since the capture (``model.to``, ``param.data = ...``)
  drops its stack's graphs; the stack is captured again.
* A capture that fails (an operation CUDA graphs cannot capture, such as a host synchronisation
  inside the layer) warns once with the error, and that stack stays eager.

Gradients: a graph writes the parameter gradients into buffers that its next replay overwrites.
They become the parameters' ``.grad`` without a copy (:class:`_GraphGradients`); the stack's next
training forward first copies any ``.grad`` still held there, so accumulation over micro-batches
stays exact. A reference to a ``.grad`` taken before ``zero_grad`` is the graph's buffer, as a layer
output is. Outputs of a graphed layer are the graph's buffers too: a layer output kept past the next
step (``output_hidden_states`` stored across steps) is overwritten by the next replay. The hidden
state's gradient a layer's backward hands out lives until the backward of the layer two before it.
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
    hidden: int  # the hidden state's index among the call's tensors

    @classmethod
    def of(cls, key: tuple, tensors: list[Tensor], hidden_states: Tensor) -> "_Sample":
        hidden = next(i for i, tensor in enumerate(tensors) if tensor is hidden_states)
        return cls(key, [None if i == hidden else t.detach().clone() for i, t in enumerate(tensors)], hidden)

    def capture_arguments(self, parameters: list[nn.Parameter]) -> tuple[Tensor, ...]:
        tensors = [
            torch.randn(shape, dtype=dtype, device=device) if tensor is None else tensor
            for tensor, (shape, dtype, device, _) in zip(self.tensors, self.key[2])
        ]
        tensors = [tensor.requires_grad_(requires_grad) for tensor, (*_, requires_grad) in zip(tensors, self.key[2])]
        return (*tensors, *parameters)


@dataclass
class _LayerGraph:
    """One layer's captured forward and backward graphs with their static tensors: ``inputs`` (the
    call's tensors, then the trainable parameters), the flat ``outputs`` (``spec`` rebuilds them),
    ``grad_outputs`` (filled before the backward replay; None where an output needs no gradient) and
    ``grad_inputs`` (what the backward replay writes; None where an input needs no gradient).
    ``shared_input``: the hidden-state input is the previous layer's output buffer (its forward
    replay writes it, so no copy: a call whose hidden state is another tensor runs eagerly)."""

    forward: torch.cuda.CUDAGraph
    backward: Optional[torch.cuda.CUDAGraph]  # None: nothing to differentiate
    inputs: tuple[Tensor, ...]
    calls: int  # how many of ``inputs`` are the call's tensors (copied in at a replay)
    hidden: int  # the hidden state's index among them
    shared_input: bool
    outputs: tuple[Tensor, ...]
    spec: pytree.TreeSpec
    grad_outputs: tuple[Optional[Tensor], ...]
    grad_inputs: tuple[Optional[Tensor], ...]

    def __call__(self, *inputs: Tensor) -> Any:
        return pytree.tree_unflatten(list(_Replay.apply(self, *inputs)), self.spec)

    def reads(self, hidden_states: Tensor) -> bool:
        """Whether a replay can take ``hidden_states``: any tensor, or where the input buffer is the
        previous layer's output, that very buffer (a copy into it would overwrite that output)."""
        return not self.shared_input or hidden_states.data_ptr() == self.inputs[self.hidden].data_ptr()


class _Replay(torch.autograd.Function):
    """A layer's graphs as an autograd node: forward copies the call's tensors into the static inputs
    (but those already there) and replays the forward graph; backward copies the incoming gradients
    into the static gradient outputs (likewise) and replays the backward graph. The outputs and the
    input gradients handed out are the graphs' static buffers, valid until their next replay."""

    @staticmethod
    def forward(ctx, graph: _LayerGraph, *inputs: Tensor) -> tuple[Tensor, ...]:
        ctx.graph = graph
        for static, given in zip(graph.inputs[: graph.calls], inputs):
            if static.data_ptr() != given.data_ptr():
                static.copy_(given)
        graph.forward.replay()
        return tuple(output.detach() for output in graph.outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Tensor) -> tuple[Optional[Tensor], ...]:
        graph = ctx.graph
        for static, grad in zip(graph.grad_outputs, grads):
            if static is not None and static.data_ptr() != grad.data_ptr():
                static.copy_(grad)
        if graph.backward is not None:
            graph.backward.replay()
        return (None, *(None if grad is None else grad.detach() for grad in graph.grad_inputs))


def _capture_stack(functions: list[Callable], arguments: list[tuple[Tensor, ...]], calls: list[int],
                   hidden: list[int], shares: list[bool], warmups: int = 3) -> list[_LayerGraph]:
    """Capture each function's forward and backward as CUDA graphs in one memory pool, all forwards
    in order, then all backwards in reverse (the order a training step runs them). ``arguments[j]``:
    function j's sample tensors (the call's ``calls[j]`` tensors, the hidden state at ``hidden[j]``,
    then the parameters to differentiate for). Where ``shares[j]``, function j follows function j-1
    in the stack and takes its output as hidden state, and the two share buffers:

    * function j's hidden-state input buffer is function j-1's output buffer (no copy at a replay, and
      no second copy of what a checkpointed layer keeps for its backward);
    * function j's backward writes the hidden state's gradient into one of two buffers taken in turn
      (a copy at the graph's end), which is function j-1's incoming-gradient buffer: two hidden-size
      buffers for the stack instead of one per layer.

    Every other incoming-gradient buffer (the last layer's, the router logits') is filled by a copy
    just before its backward replay and read only during it: one buffer per shape and dtype serves
    all layers. Temporaries of the captures come from the pool and are reused between graphs."""
    torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):  # kernels compile and allocate outside the captures
        for function, sample in zip(functions, arguments):
            inputs = [a for a in sample if a.requires_grad]
            for _ in range(warmups):
                outputs = [o for o in pytree.tree_leaves(function(*sample)) if isinstance(o, Tensor) and o.requires_grad]
                if outputs and inputs:
                    torch.autograd.grad(outputs, inputs, [torch.randn_like(o) for o in outputs], allow_unused=True)
                del outputs
    torch.cuda.synchronize()
    pool = torch.cuda.graph_pool_handle()
    shares = list(shares)
    forwards, static_inputs, static_outputs, specs = [], [], [], []
    turns: list[Tensor] = []  # the two hidden-state gradient buffers, taken in turn
    for j, (function, sample) in enumerate(zip(functions, arguments)):
        sample = list(sample)
        if shares[j]:  # only where the previous output stands in for this hidden state exactly
            previous, own = static_outputs[j - 1][0], sample[hidden[j]]
            template = turns[0] if turns else own
            shares[j] = (
                isinstance(previous, Tensor) and previous.requires_grad == own.requires_grad
                and (previous.shape, previous.dtype, previous.device) == (own.shape, own.dtype, own.device)
                and (template.shape, template.dtype) == (own.shape, own.dtype)
            )
        if shares[j]:
            sample[hidden[j]] = previous.detach().requires_grad_(own.requires_grad)
            if not turns:
                turns = [torch.empty_like(own) for _ in range(2)]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            flat, spec = pytree.tree_flatten(function(*sample))
        forwards.append(graph)
        static_inputs.append(tuple(sample))
        static_outputs.append(tuple(flat))
        specs.append(spec)
    copied_in: dict[tuple, Tensor] = {}  # one incoming-gradient buffer per (shape, dtype) for the rest
    backwards, grad_outputs, grad_inputs = [None] * len(functions), [None] * len(functions), [None] * len(functions)
    for j in reversed(range(len(functions))):
        outputs, inputs = static_outputs[j], static_inputs[j]
        incoming: list[Optional[Tensor]] = []
        for k, output in enumerate(outputs):
            if not (isinstance(output, Tensor) and output.requires_grad):
                incoming.append(None)
            elif k == 0 and j + 1 < len(functions) and shares[j + 1]:
                incoming.append(turns[(j + 1) % 2])
            else:
                slot = (tuple(output.shape), output.dtype, output.device)
                if slot not in copied_in:
                    copied_in[slot] = torch.empty_like(output)
                incoming.append(copied_in[slot])
        differentiable = [k for k, output in enumerate(outputs) if incoming[k] is not None]
        wanted = [k for k, tensor in enumerate(inputs) if tensor.requires_grad]
        grads: list[Optional[Tensor]] = [None] * len(inputs)
        graph = torch.cuda.CUDAGraph() if differentiable and wanted else None
        if graph is not None:
            with torch.cuda.graph(graph, pool=pool):
                found = torch.autograd.grad([outputs[k] for k in differentiable], [inputs[k] for k in wanted],
                                            [incoming[k] for k in differentiable], allow_unused=True)
                for k, grad in zip(wanted, found):
                    grads[k] = grad
                if shares[j] and inputs[hidden[j]].requires_grad:  # the previous layer's incoming gradient
                    turn = turns[j % 2]
                    grads[hidden[j]] = turn.zero_() if grads[hidden[j]] is None else turn.copy_(grads[hidden[j]])
                del found
        backwards[j], grad_outputs[j], grad_inputs[j] = graph, tuple(incoming), tuple(grads)
    torch.cuda.synchronize()
    return [
        _LayerGraph(forwards[j], backwards[j], static_inputs[j], calls[j], hidden[j], shares[j], static_outputs[j],
                    specs[j], grad_outputs[j], grad_inputs[j])
        for j in range(len(functions))
    ]


@dataclass
class _Graphs:
    """The captured graphs of one stack: per layer the key it was captured for, its graphs (None:
    that layer was not captured) and the addresses of its weights at capture."""

    keys: list[Optional[tuple]]
    functions: list[Optional[_LayerGraph]]
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
        if graphed is not None and not graphed.reads(hidden_states):
            graphed = None  # the previous layer ran eagerly, or its output was changed on the way
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

    def _graphed(self, i: int, key: tuple) -> Optional[_LayerGraph]:
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
        functions = [_layer_function(self.forwards[i], samples[i].key) for i in chosen]
        arguments = [samples[i].capture_arguments(list(a.values())) for i, a in zip(chosen, aliases)]
        calls = [len(samples[i].tensors) for i in chosen]
        hidden = [samples[i].hidden for i in chosen]
        shares = [j > 0 and chosen[j - 1] == i - 1 for j, i in enumerate(chosen)]
        # Garbage collected during a capture (an old graph, a pinned buffer, a CUDA event of an earlier
        # model) frees device resources, which a capturing stream does not allow: collect first, and
        # not during it (torch did the same before its captures until 2.9).
        stream, collecting = torch.cuda.current_stream(), gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            with _autocast_cache_off(), _swapped(self.layers, chosen, aliases), hf_output_recording_paused(), _quiet():
                graphed = _capture_stack(functions, arguments, calls, hidden, shares)
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
    """Without autocast's weight-cast cache: a cast cached inside a capture would be a pool tensor that
    outlives it; the graphs cast as they replay."""
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
