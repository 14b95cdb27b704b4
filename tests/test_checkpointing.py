"""Activation checkpointing / host offload of decoder layers: gradients equal plain training.

On CPU, ``mode="offload"`` falls back to recompute; ``HostOffloader(emulate_on_cpu=True)`` runs the
offload Function and its buffer pool / prefetch bookkeeping with synchronous copies. On CUDA both
offload variants take the real side-stream + pinned-memory path.
"""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer
from tiny_models import (
    CHECKPOINTING_HIDDEN,
    CHECKPOINTING_VOCAB,
    checkpointing_gpt2,
    checkpointing_llama,
    checkpointing_lora,
)

from lightning_fastft.callbacks.offload import ActivationCheckpointing, ActivationOffload
from lightning_fastft.training.memory_plan import host_piece_sizes
from lightning_fastft.training.checkpointing import (
    HostOffloader,
    apply_activation_checkpointing,
    checkpointed_layer_indices,
    checkpointed_layers,
    find_decoder_layer_lists,
    hf_gradient_checkpointing_on,
    remove_activation_checkpointing,
)

BATCH, SEQ, VOCAB = 2, 11, CHECKPOINTING_VOCAB
BUILDERS = {"llama": checkpointing_llama, "gpt2": checkpointing_gpt2}


def make_batch(device):
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), device=device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding in the second row
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_grads(model, batch, seed, autocast_dtype=None):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = model(**batch).loss
    loss.backward()  # outside autocast, as Lightning does it
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same_training(reference, wrapped, device, steps=1, autocast_dtype=None):
    for step in range(steps):
        batch = make_batch(device)
        ref_loss, ref_grads = loss_and_grads(reference, batch, step, autocast_dtype)
        loss, grads = loss_and_grads(wrapped, batch, step, autocast_dtype)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for name, ref_grad in ref_grads.items():
            assert ref_grad is not None and ref_grad.abs().sum() > 0, name
            torch.testing.assert_close(grads[name], ref_grad, rtol=1e-6, atol=1e-6, msg=name)


def checkpointed_copy(model, variant, checkpoint_fraction=1.0):
    wrapped = copy.deepcopy(model)
    if variant.startswith("offload_emulated"):
        offloader = HostOffloader(emulate_on_cpu=True)
        if variant == "offload_emulated_pieces":  # every layer input spread over several host pieces
            offloader.piece_bytes = 64
        apply_activation_checkpointing(wrapped, "offload", offloader=offloader, checkpoint_fraction=checkpoint_fraction)
    else:
        apply_activation_checkpointing(wrapped, variant, checkpoint_fraction=checkpoint_fraction)
    return wrapped


VARIANTS = ["recompute", "offload", "offload_emulated", "offload_emulated_pieces"]  # on CUDA both offload variants stream to pinned memory


@pytest.mark.filterwarnings("ignore:lightning_fastft. activation offload needs CUDA")
@pytest.mark.parametrize(
    "arch, lora, variant",
    [("llama", lora, variant) for lora in (False, True) for variant in VARIANTS]
    + [("gpt2", False, "recompute"), ("gpt2", False, "offload"), ("gpt2", True, "offload_emulated")],
)
def test_grads_equal_no_checkpointing(arch, lora, variant, device):
    """Dropout is on: equal grads also mean the recompute replays the forward's random masks."""
    model = BUILDERS[arch]().to(device)
    if lora:
        model = checkpointing_lora(model)  # frozen embeddings: the first layer's input needs no grad
    model.train()
    assert_same_training(model, checkpointed_copy(model, variant), device)


@pytest.mark.parametrize("variant", ["recompute", "offload_emulated"])
def test_grads_equal_under_autocast(variant, device):
    """The recompute re-enters the forward's autocast (bf16), so it matches the saved-activation grads."""
    model = checkpointing_lora(checkpointing_llama()).to(device).train()
    wrapped = checkpointed_copy(model, variant)
    assert_same_training(model, wrapped, device, autocast_dtype=torch.bfloat16)


def ddp_grads_match(variant: str, device: str, store: str) -> int:
    """Two DDP steps of a checkpointed copy against the plain model; returns how many grads matched."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = checkpointing_lora(checkpointing_llama()).to(device).train()
    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo", init_method=f"file://{store}", rank=0, world_size=1,
        timeout=timedelta(seconds=120),
    )  # fmt: skip
    matched = 0
    try:
        wrapped = DistributedDataParallel(checkpointed_copy(model, variant))
        for step in range(2):  # step 2 fails if step 1 left a parameter unreduced
            batch = make_batch(device)
            _, ref_grads = loss_and_grads(model, batch, step)
            torch.manual_seed(step)
            wrapped.zero_grad(set_to_none=True)
            wrapped(**batch).loss.backward()
            for name, param in wrapped.module.named_parameters():
                if param.requires_grad:
                    torch.testing.assert_close(param.grad, ref_grads[name], rtol=1e-6, atol=1e-6, msg=name)
                    matched += 1
    finally:
        dist.destroy_process_group()
    return matched


DDP_SCRIPT = """
import faulthandler, sys
faulthandler.dump_traceback_later(300, exit=True)  # a hang prints every thread's stack and fails
sys.path.insert(0, {tests!r})
import torch
from test_checkpointing import ddp_grads_match
torch.manual_seed({seed})
print("matched", ddp_grads_match({variant!r}, {device!r}, {store!r}))
"""


@pytest.mark.ddp
@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["recompute", "offload_emulated"])
def test_grads_equal_under_ddp(variant, device, tmp_path):
    """DDP's reducer sees every LoRA grad (a missed one errors on the next step) and averages them.

    Runs in a fresh process: a process group is process-wide state, and the pytest process carries
    threads left by earlier tests (wandb's service) that a gloo run should not share.
    """
    seed = int(torch.randint(0, 2**31 - 1, ()))
    script = DDP_SCRIPT.format(
        tests=str(Path(__file__).parent), seed=seed, variant=variant, device=device, store=str(tmp_path / "store")
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=420)
    assert completed.returncode == 0, completed.stderr[-4000:]
    trainable = sum(p.requires_grad for p in checkpointing_lora(checkpointing_llama()).parameters())
    assert completed.stdout.split()[-2:] == ["matched", str(2 * trainable)]


@pytest.mark.parametrize("variant", ["recompute", "offload_emulated"])
def test_partial_checkpointing_grads_equal_no_checkpointing(variant, device):
    """Half the layers checkpointed, the others saving their activations: same loss and grads."""
    model = checkpointing_lora(checkpointing_llama(layers=4)).to(device).train()
    wrapped = checkpointed_copy(model, variant, checkpoint_fraction=0.5)
    assert len(checkpointed_layers(wrapped)) == 2
    assert_same_training(model, wrapped, device, steps=2)


@pytest.mark.parametrize(
    "layers, fraction, indices",
    [(3, 1 / 3, [2]), (3, 0.5, [1, 2]), (3, 1.0, [0, 1, 2]), (4, 0.5, [1, 3]), (4, 0.25, [3]), (5, 0.6, [1, 3, 4])],
)
def test_fraction_checkpoints_evenly_spread_layers(layers, fraction, indices):
    model = checkpointing_gpt2(layers=layers)
    stack = model.transformer.h
    assert checkpointed_layer_indices(layers, fraction) == indices
    wrapped = apply_activation_checkpointing(model, "recompute", checkpoint_fraction=fraction)
    assert wrapped == [stack[i] for i in indices] == checkpointed_layers(model)
    for i, layer in enumerate(stack):
        assert ("forward" in layer.__dict__) == (i in indices), i


@pytest.mark.parametrize("fraction", [0, 1.5, -0.5])
def test_fraction_out_of_range_raises(fraction):
    model = checkpointing_llama(layers=2)
    with pytest.raises(ValueError, match=r"checkpoint_fraction must be a number in \(0, 1\]"):
        apply_activation_checkpointing(model, "recompute", checkpoint_fraction=fraction)
    assert checkpointed_layers(model) == []
    with pytest.raises(ValueError, match=r"checkpoint_fraction must be a number in \(0, 1\]"):
        ActivationCheckpointing("recompute", checkpoint_fraction=fraction)
    with pytest.raises(ValueError, match=r"checkpointing must be one of \('recompute', 'offload', 'auto'\), got None"):
        apply_activation_checkpointing(model, None)


def test_reapplying_a_smaller_fraction_unwraps_the_rest(device):
    model = checkpointing_llama(layers=4).to(device)
    layers = model.model.layers
    apply_activation_checkpointing(model, "offload", offloader=HostOffloader(emulate_on_cpu=True))
    assert checkpointed_layers(model) == list(layers)
    apply_activation_checkpointing(model, "recompute", checkpoint_fraction=0.25)
    assert checkpointed_layers(model) == [layers[3]]
    assert all("forward" not in layer.__dict__ for layer in layers[:3])
    callback = ActivationCheckpointing("recompute", checkpoint_fraction=0.5)
    callback.on_fit_start(None, model)
    assert callback.wrapped_layers == 2 and checkpointed_layers(model) == [layers[1], layers[3]]
    assert remove_activation_checkpointing(model) == 2


def test_state_dict_keys_unchanged_and_removable(device):
    model = checkpointing_lora(checkpointing_llama()).to(device)
    keys = list(model.state_dict().keys())
    layers = apply_activation_checkpointing(model, "offload")
    assert len(layers) == 3
    assert list(model.state_dict().keys()) == keys
    apply_activation_checkpointing(model, "recompute")  # re-applying replaces the wrapping
    assert list(model.state_dict().keys()) == keys
    assert remove_activation_checkpointing(model) == 3
    assert all("forward" not in layer.__dict__ for layer in layers)


def test_wraps_and_restores_a_foreign_instance_forward(device):
    """A layer already patched per instance (e.g. by accelerate hooks) keeps that patch inside ours."""
    model = checkpointing_llama(layers=2).to(device)
    calls = []
    layer = model.model.layers[0]
    class_forward = layer.forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return class_forward(*args, **kwargs)

    layer.forward = counting_forward
    apply_activation_checkpointing(model, "recompute")
    model(**make_batch(device)).loss.backward()
    assert len(calls) == 2  # forward and its recompute
    remove_activation_checkpointing(model)
    assert layer.forward is counting_forward


def test_finds_the_decoder_stack_of_wrapped_models():
    from lightning.pytorch import LightningModule

    class Holder(LightningModule):
        def __init__(self):
            super().__init__()
            self.model = checkpointing_lora(checkpointing_gpt2(layers=2))

    stacks = find_decoder_layer_lists(Holder())
    assert [len(stack) for stack in stacks] == [2]
    assert type(stacks[0][0]).__name__ == "GPT2Block"


def test_turns_off_hf_gradient_checkpointing():
    model = checkpointing_lora(checkpointing_llama())
    model.get_base_model().model.layers[1].gradient_checkpointing = True  # as HF's enable does
    assert hf_gradient_checkpointing_on(model)
    with pytest.warns(UserWarning, match="turning off HF gradient checkpointing"):
        apply_activation_checkpointing(model, "recompute")
    assert not hf_gradient_checkpointing_on(model)


class RecordingOffloader(HostOffloader):
    """Emulated offloader that counts offloads and logs which inputs were already prefetched when fetched."""

    def __init__(self):
        super().__init__(emulate_on_cpu=True)
        self.offloads = 0
        self.fetched_prefetched: list[bool] = []

    def offload(self, tensor, slot):
        self.offloads += 1
        return super().offload(tensor, slot)

    def fetch(self, stored):
        self.fetched_prefetched.append(stored.device_copy is not None)
        return super().fetch(stored)


def test_offload_prefetches_one_layer_ahead_and_reuses_buffers(device):
    model = checkpointing_llama(layers=4).to(device)
    offloader = RecordingOffloader()
    apply_activation_checkpointing(model, "offload", offloader=offloader)
    for _ in range(3):
        model(**make_batch(device)).loss.backward()
    # the first fetched input of each backward (last layer) was not prefetched, the 3 others were
    assert offloader.fetched_prefetched == [False, True, True, True] * 3
    assert offloader.host_buffers_allocated == 4 and offloader.offloads == 12
    with torch.no_grad():  # eval / no_grad: plain forward, nothing stored
        model.eval()(**make_batch(device))
    assert offloader.offloads == 12


def test_partial_offload_prefetches_across_plain_layers(device):
    """Layers 1, 3, 4 of 5 offloaded: each fetch prefetches the previous offloaded input, skipping
    the plain layers (0 and 2) whose activations stay in the graph."""
    model = checkpointing_llama(layers=5).to(device)
    offloader = RecordingOffloader()
    apply_activation_checkpointing(model, "offload", offloader=offloader, checkpoint_fraction=0.6)
    for _ in range(2):
        model(**make_batch(device)).loss.backward()
    assert offloader.fetched_prefetched == [False, True, True] * 2
    assert offloader.host_buffers_allocated == 3 and offloader.offloads == 6


@pytest.mark.parametrize("numel", [1, 5, 16, 17, 100, 1000, 12345])
@pytest.mark.parametrize("element_size", [2, 4])
def test_host_pieces_are_powers_of_two_covering_the_input(numel, element_size):
    piece_bytes = 64
    sizes = host_piece_sizes(numel, element_size, piece_bytes)
    assert all((size * element_size) & (size * element_size - 1) == 0 for size in sizes), sizes  # powers of two
    assert sizes == sorted(sizes, reverse=True) and sum(sizes) >= numel
    unit = piece_bytes // element_size
    if numel > unit:  # less than one piece_bytes unit over what is needed, at least one unit each
        assert sum(sizes) - numel < unit and min(sizes) >= unit
    else:
        assert len(sizes) == 1 and sizes[0] < 2 * numel


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host buffers need CUDA")
def test_growing_inputs_give_the_smaller_pinned_buffer_back(monkeypatch):
    from lightning_fastft.training import checkpointing

    emptied = []
    monkeypatch.setattr(checkpointing, "_empty_host_cache", lambda: emptied.append(True))
    offloader = HostOffloader()
    for numel in (100, 100, 10_000):
        tensor = torch.randn(numel, device="cuda")
        torch.testing.assert_close(offloader.fetch(offloader.offload(tensor, slot=0)), tensor, rtol=0, atol=0)
    assert offloader.host_buffers_allocated == 2 and len(emptied) == 1


def test_offload_refuses_what_the_host_cannot_hold(monkeypatch):
    from lightning_fastft.training import checkpointing

    monkeypatch.setattr(checkpointing, "host_memory_available", lambda: checkpointing.HOST_MARGIN_BYTES + 1000)
    offloader = HostOffloader(emulate_on_cpu=True)
    stored = offloader.offload(torch.randn(100), slot=0)  # 512 bytes: fits
    with pytest.raises(MemoryError, match=r"checkpointing='offload' needs 0\.00 GiB more host memory .*checkpointing='auto'"):
        offloader.offload(torch.randn(1000), slot=1)  # 4096 bytes: does not
    assert offloader.fetch(stored).numel() == 100


def test_offload_two_forwards_before_backward(device):
    """Buffers are not handed out again before their backward ran; freed graphs return them."""
    model = checkpointing_llama(dropout=0.0).to(device)
    reference = copy.deepcopy(model)
    offloader = HostOffloader(emulate_on_cpu=True)
    apply_activation_checkpointing(model, "offload", offloader=offloader)
    first, second = make_batch(device), make_batch(device)
    (model(**first).loss + model(**second).loss).backward()
    (reference(**first).loss + reference(**second).loss).backward()
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-6, atol=1e-6, msg=name)
    assert offloader.host_buffers_allocated == 6
    loss = model(**first).loss  # graph dropped without backward: its buffers go back to the pool
    del loss
    model(**second).loss.backward()
    assert offloader.host_buffers_allocated == 6


def test_offload_backward_twice_raises(device):
    model = checkpointing_llama(layers=2).to(device)
    apply_activation_checkpointing(model, "offload", offloader=HostOffloader(emulate_on_cpu=True))
    loss = model(**make_batch(device)).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already used by a backward"):
        loss.backward()


def test_recompute_frees_the_layer_inputs_at_backward(device):
    """The inputs kept for the recompute go with the backward, not with the graph: a loss tensor
    kept past ``backward()`` (a plain loop's ``loss = ...``) must not hold every layer's input into
    the next step's forward."""
    import weakref

    model = checkpointing_llama(layers=3, dropout=0.0).to(device)
    apply_activation_checkpointing(model, "recompute")
    inputs = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda module, args, kwargs: inputs.append(weakref.ref(
            args[0] if args else kwargs["hidden_states"])), with_kwargs=True)  # fmt: skip
    loss = model(**make_batch(device)).loss
    assert len(inputs) == 3 and all(ref() is not None for ref in inputs)
    loss.backward()
    assert [ref() is None for ref in inputs] == [True, True, True]
    assert loss.grad_fn is not None  # the graph itself is still referenced


def count_saved_hidden_states(model, device):
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**make_batch(device)).loss
    loss.backward()
    return sum(shape == (BATCH, SEQ, CHECKPOINTING_HIDDEN) for shape in shapes)


def test_offload_keeps_no_hidden_states_per_layer(device):
    counts = {}
    for layers in (2, 5):
        model = checkpointing_llama(layers=layers).to(device)
        plain = count_saved_hidden_states(model, device)
        apply_activation_checkpointing(model, "offload", offloader=HostOffloader(emulate_on_cpu=True))
        counts[layers] = count_saved_hidden_states(model, device)
        assert plain > counts[layers] + 2 * layers
    assert counts[2] == counts[5]  # only the layers' outside (final norm, lm_head) saves any


@pytest.mark.filterwarnings("ignore:lightning_fastft. activation offload needs CUDA")
def test_lightning_fit_with_callback_and_accumulation(tmp_path, device):
    import lightning.pytorch as pl

    class TinyLM(pl.LightningModule):
        def __init__(self, state):
            super().__init__()
            self.state = state
            self.model = None

        def configure_model(self):
            if self.model is None:
                self.model = checkpointing_llama()
                self.model.load_state_dict(self.state)

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    state = checkpointing_llama().state_dict()
    batches = [make_batch("cpu") for _ in range(4)]

    def fit(callbacks):
        pl.seed_everything(0)
        module = TinyLM(state)
        trainer = quiet_trainer(
            device, max_epochs=1, accumulate_grad_batches=2, callbacks=callbacks, default_root_dir=tmp_path
        )
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
        return module.model.state_dict()

    with pytest.warns(DeprecationWarning, match="ActivationOffload.*deprecated"):
        callback = ActivationOffload()  # the deprecated name: offload, every layer
    trained = fit([callback])
    reference = fit([])
    assert callback.wrapped_layers == 3
    assert any(not torch.equal(trained[name], state[name].to(trained[name].device)) for name in state)
    for name, value in reference.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-6, atol=1e-6, msg=name)
