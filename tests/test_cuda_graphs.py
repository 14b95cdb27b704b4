"""CUDA graphs of the decoder layers (``cuda_graphs=True``): the graphed training equals the eager one
(losses and every LoRA gradient, micro-batch accumulation included) and the graphs are really
replayed; shape changes, dropout, two forwards before one backward and moved weights fall back to
the layers' own forwards. The capture itself needs CUDA; on a CPU the wiring, the fallback and the
gradient bookkeeping are tested."""

import copy
import gc

import lightning.pytorch as pl
import pytest
import torch
from tiny_models import (
    LORA_VOCAB,
    PATCHING_VOCAB,
    checkpointing_llama,
    checkpointing_lora,
    lora_llama,
    moe_lm,
    patching_lm,
    random_lora_b,
)

from lightning_fastft.patching import patch_model
from lightning_fastft.patching.options import PatchOptions
from lightning_fastft.training import cuda_graphs
from lightning_fastft.training.checkpointing import apply_activation_checkpointing
from lightning_fastft.training.cuda_graphs import (
    _GraphGradients,
    _unshare_gradients,
    call_signature,
    cuda_graphs_of,
    remove_cuda_graphs,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _lora_model(device):
    model, _ = lora_llama(device)
    return model


def _train(model, batches, accumulate=1, lr=1e-2):
    """AdamW steps over ``batches`` (``accumulate`` micro-batches per step): the losses and, per step,
    the trainable gradients."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, grads = [], []
    for start in range(0, len(batches), accumulate):
        for batch in batches[start : start + accumulate]:
            loss = model(input_ids=batch, labels=batch).loss
            (loss / accumulate).backward()
            losses.append(loss.detach().float())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, grads


def _assert_same(result, reference, tol=1e-6):
    (losses, grads), (ref_losses, ref_grads) = result, reference
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=tol, atol=tol)
    for step, (got, want) in enumerate(zip(grads, ref_grads)):
        assert got.keys() == want.keys()
        for name in want:
            assert want[name].abs().sum() > 0, name
            torch.testing.assert_close(got[name], want[name], rtol=tol, atol=tol, msg=f"step {step}: {name}")


def _batches(lengths, device, vocab=LORA_VOCAB, rows=2):
    return [torch.randint(0, vocab, (rows, length), device=device) for length in lengths]


def _graphed_and_eager(model, checkpointing="recompute", **options):
    eager = copy.deepcopy(model)
    patch_model(eager, checkpointing=checkpointing, **options)
    graphed = copy.deepcopy(model)
    patch_model(graphed, checkpointing=checkpointing, cuda_graphs=True, **options)
    return graphed, eager


# ---------------------------------------------------------------- options, wiring (any device)


def test_refuses_offload_checkpointing(device):
    with pytest.raises(ValueError, match="cuda_graphs=True does not go with checkpointing='offload'"):
        PatchOptions(cuda_graphs=True, checkpointing="offload")
    model = _lora_model(device)
    apply_activation_checkpointing(model, "offload")
    with pytest.raises(ValueError, match="cannot capture layers checkpointed with 'offload'"):
        cuda_graphs.apply_cuda_graphs(model)
    layer = model.base_model.model.model.layers[0]  # what keeps a layer of an "auto" plan out of the capture
    assert cuda_graphs._not_graphed(layer) == "its input is offloaded to the host (checkpointing='auto' planned so)"


def test_refuses_a_non_bool():
    with pytest.raises(TypeError, match="cuda_graphs must be True or False"):
        PatchOptions(cuda_graphs="yes")


def test_checkpointing_a_graphed_model_directly_raises(device):
    model = _lora_model(device)
    patch_model(model, checkpointing="recompute", cuda_graphs=True)
    with pytest.raises(ValueError, match="remove_cuda_graphs"):
        apply_activation_checkpointing(model, "recompute")
    assert remove_cuda_graphs(model) == 2 and cuda_graphs_of(model) == []
    apply_activation_checkpointing(model, "recompute")  # now allowed


def test_patching_again_replaces_the_graphs(device):
    model = _lora_model(device)
    patch_model(model, checkpointing="recompute", cuda_graphs=True)
    first = cuda_graphs_of(model)
    patch_model(model, checkpointing="recompute", cuda_graphs=True)
    assert len(cuda_graphs_of(model)) == 1 and cuda_graphs_of(model)[0] is not first[0]
    patch_model(model, checkpointing="recompute")
    assert cuda_graphs_of(model) == []
    layer = model.base_model.model.model.layers[0]
    assert "_fastft_cuda_graphs" not in layer.__dict__


def test_deepcopy_gives_an_uncaptured_copy(device):
    model = _lora_model(device)
    patch_model(model, checkpointing="recompute", cuda_graphs=True)
    clone = copy.deepcopy(model)
    (state,) = cuda_graphs_of(clone)
    assert state is not cuda_graphs_of(model)[0] and state.graphs is None and state.captures == 0
    assert state.layers[0] is clone.base_model.model.model.layers[0]
    batch = _batches([9], device)[0]
    torch.testing.assert_close(clone(input_ids=batch).logits, model(input_ids=batch).logits)


def test_call_signature_separates_what_a_graph_depends_on():
    x = torch.randn(2, 5, 4)
    cos = torch.randn(2, 5, 3)
    key, tensors = call_signature((x,), {"position_embeddings": (cos, cos), "use_cache": False})
    assert tensors == [x, cos, cos]
    same = call_signature((torch.randn(2, 5, 4),), {"position_embeddings": (cos, cos), "use_cache": False})[0]
    assert same == key
    others = [
        call_signature((torch.randn(2, 6, 4),), {"position_embeddings": (cos, cos), "use_cache": False}),
        call_signature((x.double(),), {"position_embeddings": (cos, cos), "use_cache": False}),
        call_signature((x.requires_grad_(),), {"position_embeddings": (cos, cos), "use_cache": False}),
        call_signature((x,), {"position_embeddings": (cos, cos), "use_cache": True}),
        call_signature((x,), {"position_embeddings": (cos, None), "use_cache": False}),
    ]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_available()):
        others.append(call_signature((x,), {"position_embeddings": (cos, cos), "use_cache": False}))
    keys = [key] + [other[0] for other in others if torch.cuda.is_available() or other is not others[-1]]
    assert len(set(keys)) == len(keys)
    assert call_signature((x,), {"window": [1, 2]}) is not None  # lists are structure, not constants
    assert call_signature((x,), {"cache": {1: object}.keys()}) is None  # unhashable: not graphed


def test_hf_recording_seen_paused_and_added_to():
    """The three views of HF's output recording that the graphs rely on, inside a real MoE forward."""
    from lightning_fastft._hf import hf_output_recording_paused, hf_record, hf_recorded_outputs

    model = moe_lm("qwen3_moe")  # output_router_logits=True; layer 0 sparse, layer 1 dense
    seen = []

    def hook(module, args):
        seen.append(hf_recorded_outputs())
        with hf_output_recording_paused():
            seen.append(hf_recorded_outputs())
        hf_record("router_logits", [torch.zeros(2 * 6, 7)])
        hf_record("attentions", [torch.zeros(1)])  # not recorded in this forward: ignored

    model.model.layers[0].register_forward_pre_hook(hook)
    output = model(input_ids=torch.randint(0, 97, (2, 6)))
    assert seen == [("router_logits",), ()]
    assert hf_recorded_outputs() == ()  # outside a forward
    assert len(output.router_logits) == 2 and torch.equal(output.router_logits[0], torch.zeros(12, 7))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_graph_gradients_become_grad_uncopied_and_accumulate_exactly(set_to_none):
    """A graph hands out its gradient buffers: kept as .grad (no copy), copied before the stack's
    next forward, whose replays may overwrite them (one memory pool for all the stack's graphs), so
    that accumulation over micro-batches and zero_grad both stay exact."""
    buffer = torch.zeros(3)

    class Replayed(torch.autograd.Function):  # as a graph's backward replay: a static buffer
        @staticmethod
        def forward(ctx, weight, x):
            ctx.save_for_backward(x)
            return weight * x

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            buffer.copy_(grad * x)
            return buffer.detach(), None

    def step(weight, x, held, unshare=True):  # as StackGraphs.call at the first layer, then a replay
        if unshare:
            _unshare_gradients(held)
        buffer.fill_(float("nan"))  # another layer's forward replay writing into the shared pool
        Replayed.apply(_GraphGradients.apply(held, weight)[0], x).sum().backward()

    weight, held = torch.nn.Parameter(torch.randn(3)), {}
    step(weight, torch.full((3,), 1.0), held)
    assert weight.grad.data_ptr() == buffer.data_ptr() and held == {weight: buffer.data_ptr()}  # no copy
    step(weight, torch.full((3,), 2.0), held)  # a second micro-batch
    torch.testing.assert_close(weight.grad, torch.full((3,), 3.0))
    weight.grad = None if set_to_none else weight.grad.zero_()
    step(weight, torch.full((3,), 5.0), held)
    step(weight, torch.full((3,), 7.0), held)
    torch.testing.assert_close(weight.grad, torch.full((3,), 12.0))

    weight, held = torch.nn.Parameter(torch.randn(3)), {}
    for x in (1.0, 2.0):
        step(weight, torch.full((3,), x), held, unshare=False)
    assert not torch.equal(weight.grad, torch.full((3,), 3.0))  # the failure the copy prevents


def test_replay_copies_what_is_not_in_place_and_hands_out_its_buffers():
    """A layer's graphs as an autograd node (stand-ins for the CUDA graphs, which replay y = 2x and
    dx = 3 dy between static buffers): a call's tensor is copied into the static input unless it is that
    buffer, the incoming gradient likewise; the output and the input gradient handed out are the static
    buffers. A shared input buffer (the previous layer's output) takes only itself."""
    import torch.utils._pytree as pytree

    from lightning_fastft.training.cuda_graphs import _LayerGraph

    static_x, static_y, static_dy, static_dx = (torch.full((3,), float("nan")) for _ in range(4))
    replays = []

    class Replayed:
        def __init__(self, run):
            self.replay = lambda: replays.append(run()) or None

    graph = _LayerGraph(
        Replayed(lambda: static_y.copy_(2 * static_x)), Replayed(lambda: static_dx.copy_(3 * static_dy)),
        (static_x,), 1, 0, False, (static_y,), pytree.tree_flatten(static_y)[1], (static_dy,), (static_dx,),
    )  # fmt: skip
    x = torch.randn(3, requires_grad=True)
    y = graph(x)
    assert y.data_ptr() == static_y.data_ptr() and torch.equal(static_x, x.detach())
    torch.testing.assert_close(y, 2 * x.detach())
    dy = torch.randn(3)
    y.backward(dy)
    torch.testing.assert_close(x.grad, 3 * dy)
    assert len(replays) == 2 and graph.reads(torch.zeros(3))
    shared = _LayerGraph(**{**graph.__dict__, "shared_input": True})
    assert shared.reads(static_x) and not shared.reads(x)
    static_x.copy_(torch.arange(3.0)).requires_grad_()
    torch.testing.assert_close(shared(static_x), 2 * torch.arange(3.0))  # its own buffer, taken as it is


def test_on_a_cpu_the_layers_run_their_own_forward_once_warned(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "_warned_no_cuda", False)
    graphed, eager = _graphed_and_eager(_lora_model("cpu"))
    batches = _batches([7, 7, 7], "cpu")
    with pytest.warns(UserWarning, match="cuda_graphs needs CUDA tensors; layers on cpu"):
        result = _train(graphed, batches)
    _assert_same(result, _train(eager, batches))
    assert cuda_graphs_of(graphed)[0].replays == 0


# ---------------------------------------------------------------- on a CUDA device


@needs_cuda
@pytest.mark.parametrize("checkpointing", ["recompute", None])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_graphed_training_equals_eager(checkpointing, accumulate):
    graphed, eager = _graphed_and_eager(_lora_model("cuda"), checkpointing=checkpointing)
    batches = _batches([13] * 8, "cuda")
    _assert_same(_train(graphed, batches, accumulate), _train(eager, batches, accumulate))
    (state,) = cuda_graphs_of(graphed)
    assert state.captures == 1 and state.eager_reason is None
    assert state.replays == 2 * (len(batches) - 1)  # 2 layers; the first forward runs eagerly


@needs_cuda
@pytest.mark.parametrize("checkpointing", ["recompute", None])
def test_consecutive_layers_share_their_buffers(checkpointing):
    """Five layers: each layer's input buffer is the previous layer's output buffer, the hidden state's
    gradient passes through two buffers taken in turn (layer j writes turn j % 2, which layer j-1
    reads), and training with accumulation still equals eager."""
    model, _ = lora_llama("cuda", layers=5)
    graphed, eager = _graphed_and_eager(model, checkpointing=checkpointing)
    batches = _batches([11] * 8, "cuda")
    _assert_same(_train(graphed, batches, accumulate=2), _train(eager, batches, accumulate=2))
    (state,) = cuda_graphs_of(graphed)
    assert state.captures == 1 and state.replays == 5 * 7
    graphs = state.graphs.functions
    assert [graph.shared_input for graph in graphs] == [False, True, True, True, True]
    turns = set()
    for before, graph in zip(graphs, graphs[1:]):
        assert graph.inputs[graph.hidden].data_ptr() == before.outputs[0].data_ptr()
        assert before.grad_outputs[0].data_ptr() == graph.grad_inputs[graph.hidden].data_ptr()
        turns.add(before.grad_outputs[0].data_ptr())
    assert len(turns) == 2
    pointers = [graph.grad_outputs[0].data_ptr() for graph in graphs[:-1]]
    assert pointers[0::2] == [pointers[0]] * len(pointers[0::2]) and pointers[1::2] == [pointers[1]] * 2


@needs_cuda
def test_a_hidden_state_changed_between_layers_runs_the_next_layer_eagerly():
    """A hook on layer 0 hands layer 1 another tensor than layer 0's output buffer, which is layer 1's
    input buffer: layer 1 (and so every later layer) runs eagerly instead of copying over layer 0's
    output, and training equals eager."""
    model, _ = lora_llama("cuda", layers=3)
    graphed, eager = _graphed_and_eager(model)
    for patched in (graphed, eager):
        patched.base_model.model.model.layers[0].register_forward_hook(lambda module, args, output: output * 0.5)
    batches = _batches([10] * 4, "cuda")
    _assert_same(_train(graphed, batches), _train(eager, batches))
    (state,) = cuda_graphs_of(graphed)
    assert state.captures == 1 and state.replays == 3  # layer 0 in steps 2..4


@needs_cuda
def test_shape_changes_run_eagerly_then_capture_again():
    graphed, eager = _graphed_and_eager(_lora_model("cuda"))
    batches = _batches([11, 11, 11, 17, 17, 17, 11], "cuda")
    _assert_same(_train(graphed, batches), _train(eager, batches))
    (state,) = cuda_graphs_of(graphed)
    assert state.captures == 2 and state.replays == 2 * 4  # steps 2, 3 (11) and 5, 6 (17)


@needs_cuda
def test_two_forwards_before_one_backward():
    graphed, eager = _graphed_and_eager(_lora_model("cuda"))

    def run(model):
        first, second = _batches([10, 10], "cuda")
        losses = []
        for _ in range(3):
            loss = model(input_ids=first, labels=first).loss + model(input_ids=second, labels=second).loss
            loss.backward()
            losses.append(loss.detach())
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return losses, [grads]

    torch.manual_seed(0)
    result = run(graphed)
    torch.manual_seed(0)
    _assert_same(result, run(eager))
    assert cuda_graphs_of(graphed)[0].replays > 0


@needs_cuda
def test_moved_weights_drop_the_graphs():
    graphed, eager = _graphed_and_eager(_lora_model("cuda"))
    batches = _batches([9] * 3, "cuda")
    _train(graphed, batches[:2])
    _train(eager, batches[:2])
    for model in (graphed, eager):  # a new allocation for one LoRA matrix of every layer
        for layer in model.base_model.model.model.layers:
            weight = layer.self_attn.q_proj.lora_A["default"].weight
            weight.data = weight.data.clone()
    (state,) = cuda_graphs_of(graphed)
    assert state.graphs is not None
    _assert_same(_train(graphed, batches), _train(eager, batches))
    assert state.captures == 2  # dropped at the first call, captured again at the next forward


@needs_cuda
def test_dropout_layers_stay_eager_with_a_warning():
    model = checkpointing_lora(checkpointing_llama(dropout=0.1)).cuda()
    graphed = copy.deepcopy(model)
    patch_model(graphed, checkpointing="recompute", cuda_graphs=True)
    batches = [torch.randint(0, 101, (2, 12), device="cuda") for _ in range(3)]
    with pytest.warns(UserWarning, match="3 of 3 decoder layers run without CUDA graphs; layer 0: dropout is active"):
        _train(graphed, batches)
    (state,) = cuda_graphs_of(graphed)
    assert state.replays == 0 and state.eager_reason.startswith("no layer can be captured (layer 0: dropout")


@needs_cuda
def test_a_failed_capture_leaves_the_stack_eager_and_the_process_as_it_was(monkeypatch):
    """A capture that fails at its end (the side stream still current, as torch leaves it) keeps the
    stack eager with the error named, restores the caller's stream and Python's garbage collector
    (off during the capture), and training goes on equal to eager."""
    model = _lora_model("cuda")
    graphed, eager = copy.deepcopy(model), copy.deepcopy(model)
    patch_model(graphed, checkpointing="recompute", cuda_graphs=True)
    patch_model(eager, checkpointing="recompute")
    side, seen = torch.cuda.Stream(), {}

    def failing_capture(*args, **kwargs):
        seen["gc_enabled"] = gc.isenabled()
        torch.cuda.set_stream(side)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs, "_capture_stack", failing_capture)
    stream = torch.cuda.current_stream()
    batches = _batches([13] * 4, "cuda")
    with pytest.warns(UserWarning, match="stays eager: its capture failed: RuntimeError: operation not permitted"):
        losses = _train(graphed, batches)
    _assert_same(losses, _train(eager, batches))
    assert seen == {"gc_enabled": False} and gc.isenabled() and torch.cuda.current_stream() == stream
    (state,) = cuda_graphs_of(graphed)
    assert state.replays == 0 and state.eager_reason.startswith("its capture failed")


@needs_cuda
def test_auto_checkpointing_graphs_the_layers_it_does_not_offload():
    """``checkpointing="auto"`` with room for every layer: its plan checkpoints none, all are graphed."""
    model = _lora_model("cuda")
    graphed = copy.deepcopy(model)
    patch_model(graphed, checkpointing="auto", memory_budget_gib=80.0, cuda_graphs=True)
    eager = copy.deepcopy(model)
    patch_model(eager, checkpointing="auto", memory_budget_gib=80.0)
    batches = _batches([13] * 4, "cuda")
    _assert_same(_train(graphed, batches), _train(eager, batches))
    (state,) = cuda_graphs_of(graphed)
    assert state.replays == 2 * 3 and state.eager_reason is None


@needs_cuda
def test_under_bf16_autocast():
    graphed, eager = _graphed_and_eager(_lora_model("cuda"))
    batches = _batches([12] * 4, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        result, reference = _train(graphed, batches), _train(eager, batches)
    _assert_same(result, reference, tol=1e-5)
    assert cuda_graphs_of(graphed)[0].replays == 2 * 3


@needs_cuda
@pytest.mark.parametrize("checkpointing", ["recompute", None])
@pytest.mark.parametrize("router_logits", [False, True])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_mixture_of_experts(model_type, router_logits, checkpointing):
    """Routing decides how many rows each expert gets: the grouped GEMMs take that on the device.
    With ``output_router_logits`` (the load-balancing loss in the training loss) the router logits
    are outputs of the graphs, handed to HF's recording with their gradient."""
    from lightning_fastft.qlora import attach_lora

    model = moe_lm(model_type, output_router_logits=router_logits)
    model = random_lora_b(attach_lora(model, lora_r=4, lora_alpha=8, target_modules="all-linear").cuda(), 0.1)
    graphed, eager = _graphed_and_eager(model, checkpointing=checkpointing)
    batches = [torch.randint(0, 97, (2, 14), device="cuda") for _ in range(4)]
    _assert_same(_train(graphed, batches), _train(eager, batches), tol=1e-5)
    (state,) = cuda_graphs_of(graphed)
    assert state.eager_reason is None and state.replays == 2 * 3


@needs_cuda
@pytest.mark.parametrize("checkpointing", ["recompute", None])
def test_qlora_dequantisation_inside_the_graphs(checkpointing):
    """QLoRA: every projection's NF4 dequantisation runs inside the captured layer (fp32 compute, so the
    graphed and eager runs agree to 1e-5)."""
    from lightning_fastft.qlora import prepare_qlora

    def build():
        torch.manual_seed(0)
        model = prepare_qlora(patching_lm("llama").cuda(), lora_r=4, lora_alpha=8, compute_dtype=torch.float32)
        return random_lora_b(model, 0.1)

    graphed, eager = build(), build()
    patch_model(graphed, checkpointing=checkpointing, cuda_graphs=True)
    patch_model(eager, checkpointing=checkpointing)
    batches = _batches([13] * 4, "cuda", vocab=PATCHING_VOCAB)
    _assert_same(_train(graphed, batches), _train(eager, batches), tol=1e-5)
    (state,) = cuda_graphs_of(graphed)
    assert state.captures == 1 and state.replays == 2 * 3 and state.eager_reason is None


@needs_cuda
def test_attentions_recorded_run_eagerly_once_warned(monkeypatch):
    """``output_attentions``: HF records them with hooks inside the layers, which a replay does not run."""
    monkeypatch.setattr(cuda_graphs, "_warned_recorded", False)
    graphed, eager = _graphed_and_eager(_lora_model("cuda"))
    for model in (graphed, eager):
        model.set_attn_implementation("eager")  # SDPA returns no attention weights
        model.config.output_attentions = True
    batches = _batches([9] * 3, "cuda")
    with pytest.warns(UserWarning, match="records attentions"):
        result = _train(graphed, batches)
    _assert_same(result, _train(eager, batches))
    assert cuda_graphs_of(graphed)[0].replays == 0


@needs_cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_fit_with_the_strategy_option(precision):
    """``FastFTStrategy(cuda_graphs=True)`` under ``Trainer.fit`` (a DataLoader, Lightning's optimizer
    loop and precision plugin) trains as the strategy without graphs, and replays the graphs."""
    from helpers import quiet_trainer
    from torch.utils.data import DataLoader

    from lightning_fastft import CausalLMFineTune, FastFTStrategy

    rows = [torch.randint(0, 50, (12,)) for _ in range(12)]
    data = [{"input_ids": row, "labels": row.clone()} for row in rows]

    def fit(cuda_graphs):
        torch.manual_seed(0)
        module = CausalLMFineTune(lora_r=4, init_seed=0)
        strategy = FastFTStrategy(checkpointing="recompute", cuda_graphs=cuda_graphs)
        losses = []

        class Record(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                losses.append(outputs["loss"].detach().float())

        trainer = quiet_trainer("cuda", max_steps=5, strategy=strategy, precision=precision, callbacks=[Record()])
        trainer.fit(module, DataLoader(data, batch_size=2, pin_memory=True))
        return losses, module

    graphed_losses, module = fit(True)
    eager_losses, _ = fit(False)
    torch.testing.assert_close(torch.stack(graphed_losses), torch.stack(eager_losses), rtol=1e-5, atol=1e-5)
    (state,) = cuda_graphs_of(module)
    assert state.replays == 2 * 4 and state.eager_reason is None

