"""``checkpointing="auto"``: the planner on made-up numbers, the measurement, the options, and
end to end on a tiny Llama: the plan follows the budget and the gradients stay those of plain training.

The end-to-end budgets are set from the planner's own numbers on the CPU (the parameters' bytes
stand for the device memory there), so they run on the CPU whatever the machine.
"""

import copy
from pathlib import Path

import pytest
import torch
from test_checkpointing import BATCH, SEQ, assert_same_training, loss_and_grads, make_batch
from tiny_models import checkpointing_llama, checkpointing_lora

from lightning_fastft.callbacks.offload import ActivationCheckpointing
from lightning_fastft.patching.options import PatchOptions
from lightning_fastft.training.checkpointing import (
    HostOffloader,
    apply_activation_checkpointing,
    checkpoint_planner_of,
    checkpointed_layers,
    remove_activation_checkpointing,
)
from lightning_fastft.training.memory_plan import (
    GIB,
    StackMemory,
    estimate_peak_bytes,
    host_bytes,
    loss_workspace_bytes,
    plan_checkpointing,
    saved_activation_bytes,
)

# ---------------------------------------------------------------- the planner, made-up numbers

STACK = StackMemory(layers=8, saved_bytes=100, input_bytes=10)
NUMBERS = dict(tokens=64, fixed_bytes=1000, loss_workspace_bytes=50)


def plan(budget, stacks=(STACK,), **overrides):
    return plan_checkpointing(list(stacks), **{**NUMBERS, **overrides}, budget_bytes=budget)


def test_estimate_by_hand():
    # bottom up: 3 offload (top one: 2A + I = 210), 3 recompute (20 kept below + 200 = 220),
    # 2 none (30 kept below + 100 + 200 = 330); end of forward 30 + 200 + 50 = 280
    assert estimate_peak_bytes([STACK], [(2, 3, 3)], 1000, 50) == 1000 + 330
    assert estimate_peak_bytes([STACK], [(8, 0, 0)], 1000, 50) == 1000 + 700 + 200
    assert estimate_peak_bytes([STACK], [(0, 8, 0)], 1000, 500) == 1000 + 80 + 500  # the loss workspace dominates
    assert estimate_peak_bytes([STACK], [(0, 0, 8)], 1000, 50) == 1000 + 210


@pytest.mark.parametrize(
    "budget, counts",
    [
        (1900, (8, 0, 0)),  # all none: the top layer's backward, 700 below + 200
        (1899, (7, 1, 0)),  # 10 + 600 below the top layer + 200
        (1805, (7, 0, 1)),  # 600 + 200 = 1800; recomputing the lowest layer costs its input: 1810
        (1525, (4, 2, 2)),  # 4 none: 20 + 300 + 200; a third recompute would make it 1530
        (1210, (1, 1, 6)),  # the least any plan needs (all offloaded: 2A + I), and already keeps one layer
    ],
)
def test_plan_maximises_plain_layers_then_recompute(budget, counts):
    result = plan(budget)
    assert (result.count(None), result.count("recompute"), result.count("offload")) == counts
    assert result.peak_bytes == estimate_peak_bytes([STACK], [counts], 1000, 50) <= budget
    assert result.checkpoint_fraction == (8 - counts[0]) / 8
    assert result.fixed_bytes == 1000 and result.budget_bytes == budget and result.tokens == 64
    with pytest.raises(ValueError, match="below the 0.00 GiB that training needs with every decoder layer offloaded"):
        plan(1209)


@pytest.mark.parametrize(
    "host_budget, counts",
    [
        (None, (4, 2, 2)),
        (48, (4, 2, 2)),  # 3 inputs of 16 host bytes: the best plan offloads only 2 anyway
        (16, (3, 5, 0)),  # one offloaded: 4 none would need 1530; its offload then turns into recompute
        (15, (3, 5, 0)),  # none offloaded
    ],
)
def test_plan_offloads_no_more_than_the_host_holds(host_budget, counts):
    assert host_bytes(10) == 16  # one piece, rounded up to a power of two
    result = plan(1525, host_budget_bytes=host_budget)
    assert (result.count(None), result.count("recompute"), result.count("offload")) == counts
    assert result.peak_bytes <= 1525


def test_plan_names_the_host_limit_when_nothing_fits():
    with pytest.raises(ValueError, match=r"every decoder layer offloaded as far as host memory holds them \(3 of 8\) "
                       r"and the rest recomputed"):
        plan(1239, host_budget_bytes=48)  # 3 offloaded, 5 recomputed: 1000 + 40 below the top + 200
    assert plan(1240, host_budget_bytes=48).count("offload") == 3


def test_plan_checkpoints_the_lowest_layers():
    result = plan(1525)
    assert result.modes == (("offload",) * 2 + ("recompute",) * 2 + (None,) * 4,)
    assert str(result).startswith("lightning_fastft: checkpointing='auto' for up to 64 tokens a batch: decoder")
    assert "4 none, 2 recompute, 2 offload; estimated peak" in str(result)


def test_plan_without_offload_recomputes_the_rest():
    result = plan(1500, offload=False)  # 4 none + 4 recompute would need 1540
    assert (result.count(None), result.count("recompute"), result.count("offload")) == (3, 5, 0)
    with pytest.raises(ValueError, match=r"below the 0\.00 GiB that training needs with every decoder layer recomputed"):
        plan(1269, offload=False)  # all recompute: 1000 + 70 below the top + 200


def test_plan_fills_the_stack_with_smaller_layers_first():
    small = StackMemory(layers=2, saved_bytes=40, input_bytes=4)
    result = plan(1210, stacks=(STACK, small))  # the big stack offloaded needs 210 already
    assert result.modes == (("offload",) * 6 + ("recompute",) * 2, (None, None))


def test_budget_below_the_fixed_memory_names_both():
    with pytest.raises(ValueError, match=r"memory_budget_gib=1\.50 GiB is below the fixed memory of training, 2\.00 GiB"):
        plan(int(1.5 * GIB), fixed_bytes=2 * GIB)
    with pytest.raises(ValueError, match=r"memory_budget_gib=2\.00 GiB is below the 2\.50 GiB .* every decoder layer "
                       r"offloaded .* of which 2\.00 GiB fixed memory"):
        plan(2 * GIB, fixed_bytes=2 * GIB, loss_workspace_bytes=GIB // 2)


# ---------------------------------------------------------------- measuring saved bytes


def test_saved_bytes_counts_each_storage_once_and_leaves_out_the_excluded():
    x = torch.randn(5, 7, requires_grad=True)
    weight = torch.randn(7, 3, requires_grad=True)

    def forward():
        hidden = x.exp()  # saves its output
        return (hidden.sin() + hidden.cos()) @ weight  # sin and cos save `hidden` again; matmul saves weight and its input

    product_input = 5 * 7 * 4
    assert saved_activation_bytes(forward, exclude=[weight, x]) == 5 * 7 * 4 + product_input
    assert saved_activation_bytes(forward) == 5 * 7 * 4 + product_input + 7 * 3 * 4


def test_layer_saved_bytes_scale_with_the_batch():
    """Measured in the planner on the real layer call: twice the rows save exactly twice the bytes,
    and a layer saves far more than its input."""
    model = lora_llama()
    batch = make_batch("cpu")
    measured = []
    for rows in (1, 2):
        wrapped = planned(model, 2**50)
        loss_and_grads(wrapped, {name: torch.cat([value] * rows) for name, value in batch.items()}, 0)
        measured.append(checkpoint_planner_of(wrapped).measured[0])
    assert measured[1].saved_bytes == 2 * measured[0].saved_bytes
    assert measured[1].input_bytes == 2 * measured[0].input_bytes == 2 * BATCH * SEQ * 36 * 4
    assert measured[0].saved_bytes > 10 * measured[0].input_bytes


def _saved_by_layer(model, index: int) -> int:
    """Bytes of the storages layer ``index`` saves for backward in a plain training forward of ``model``,
    less the parameters and what an earlier layer saved first (the rotary tables all layers share)."""
    layers = next(module for name, module in model.named_modules() if name.endswith("layers"))
    excluded = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, running = {}, [False]

    def pack(tensor):
        key = tensor.untyped_storage().data_ptr()
        if key not in excluded:
            if running[0]:
                saved.setdefault(key, tensor.untyped_storage().nbytes())
            else:
                excluded.add(key)
        return tensor

    handles = [layers[index].register_forward_pre_hook(lambda *_: running.__setitem__(0, True)),
               layers[index].register_forward_hook(lambda *_: running.__setitem__(0, False))]  # fmt: skip
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**make_batch("cpu"))
    for handle in handles:
        handle.remove()
    return sum(saved.values())


def test_measures_what_a_layer_with_an_input_gradient_saves():
    """The planner measures on the stack's first layer, whose input (the frozen embeddings' output) needs no
    gradient; every later layer's input does, and those layers save more for it (the input norm's input and
    statistics, ...). The measurement must be a later layer's, or the estimate runs low by that per layer."""
    model = lora_llama()
    assert not model.get_input_embeddings().weight.requires_grad
    first, second = _saved_by_layer(model, 0), _saved_by_layer(model, 1)
    assert second > first
    assert probe(model)[0].saved_bytes == second


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(checkpointing="auto", checkpoint_fraction=0.5), "checkpoint_fraction=0.5 conflicts with checkpointing='auto'"),
        (dict(checkpointing="recompute", memory_budget_gib=20), "memory_budget_gib=20 is read by checkpointing='auto' only"),
        (dict(memory_budget_gib=20), "memory_budget_gib=20 is read by checkpointing='auto' only"),
        (dict(checkpointing="auto", memory_budget_gib=-1), "memory_budget_gib must be a positive number of GiB, got -1"),
        (dict(checkpointing="auto", memory_budget_gib=0), "must be a positive number of GiB, got 0"),
        (dict(checkpointing="auto", memory_budget_gib=True), "must be a positive number of GiB, got True"),
        (dict(checkpointing="auto", memory_budget_gib=float("nan")), "must be a positive number of GiB, got nan"),
        (dict(checkpointing="auto", memory_budget_gib="20"), "must be a positive number of GiB, got '20'"),
    ],
)
def test_bad_checkpointing_options_raise_everywhere(options, message):
    with pytest.raises(ValueError, match=message):
        PatchOptions(**options)
    if "checkpointing" in options:  # the callback and the function need one
        with pytest.raises(ValueError, match=message):
            ActivationCheckpointing(**options)
        with pytest.raises(ValueError, match=message):
            apply_activation_checkpointing(checkpointing_llama(layers=1), **options)


def test_strategy_and_cli_take_the_budget():
    from lightning_fastft import FastFT, FastFTStrategy
    from lightning_fastft.cli import build_cli

    assert FastFTStrategy(checkpointing="auto", memory_budget_gib=17.7).patch_options.memory_budget_gib == 17.7
    assert FastFT(checkpointing="auto", memory_budget_gib=3).patch_options.checkpointing == "auto"
    args = [
        f"--config={Path(__file__).parents[1] / 'examples' / 'configs' / 'tiny_llama_lora.yaml'}",
        "--trainer.strategy.checkpointing=auto",
        "--trainer.strategy.memory_budget_gib=80",
    ]
    options = build_cli(args, run=False).trainer.strategy.patch_options
    assert (options.checkpointing, options.memory_budget_gib) == ("auto", 80.0)


# ---------------------------------------------------------------- end to end (CPU)


def lora_llama():
    return checkpointing_lora(checkpointing_llama()).train()  # dropout 0.1: the measurement must not draw from the RNG


def planned(model, budget_bytes, offloader=None):
    """A copy of ``model`` under checkpointing="auto" with the budget, after one training step."""
    wrapped = copy.deepcopy(model)
    apply_activation_checkpointing(wrapped, "auto", memory_budget_gib=budget_bytes / GIB, offloader=offloader)
    return wrapped


def probe(model):
    """The planner's numbers for ``model``: (its stack's StackMemory, fixed bytes, loss workspace bytes)."""
    wrapped = planned(model, 2**50)
    loss_and_grads(wrapped, make_batch("cpu"), 0)
    planner = checkpoint_planner_of(wrapped)
    assert planner.plan.count(None) == 3 and checkpointed_layers(wrapped) == []
    return planner.measured[0], planner.plan.fixed_bytes, loss_workspace_bytes(wrapped, BATCH * SEQ)


@pytest.mark.filterwarnings("ignore:lightning_fastft. activation offload needs CUDA")
def test_plan_follows_the_budget_and_grads_equal_plain_training():
    model = lora_llama()
    stack, fixed, loss = probe(model)
    assert stack.layers == 3 and stack.input_bytes == BATCH * SEQ * 36 * 4
    assert stack.saved_bytes > 10 * stack.input_bytes

    def budget(counts):
        return estimate_peak_bytes([stack], [counts], fixed, loss)

    cases = [  # each the fastest plan within its own estimate
        ((3, 0, 0), None),
        ((2, 1, 0), None),
        ((1, 2, 0), None),  # the top layer never needs checkpointing; no offload on the CPU by default
        ((1, 1, 1), HostOffloader(emulate_on_cpu=True)),  # as little as every layer offloaded would need
    ]
    for counts, offloader in cases:
        wrapped = planned(model, budget(counts), offloader)
        assert_same_training(model, wrapped, "cpu", steps=2)
        result = checkpoint_planner_of(wrapped).plan
        assert (result.count(None), result.count("recompute"), result.count("offload")) == counts, counts
        assert len(checkpointed_layers(wrapped)) == 3 - counts[0]
        assert result.peak_bytes == budget(counts)

    with pytest.raises(ValueError, match=r"memory_budget_gib=0\.00 GiB is below the fixed memory of training, 0\.00 GiB"):
        loss_and_grads(planned(model, fixed - 1), make_batch("cpu"), 0)


def test_plan_offloads_nothing_when_the_host_has_no_room(monkeypatch):
    from lightning_fastft.training import checkpointing

    model = lora_llama()
    stack, fixed, loss = probe(model)
    monkeypatch.setattr(checkpointing, "host_memory_available", lambda: checkpointing.HOST_MARGIN_BYTES)
    wrapped = planned(model, estimate_peak_bytes([stack], [(1, 2, 0)], fixed, loss), HostOffloader(emulate_on_cpu=True))
    loss_and_grads(wrapped, make_batch("cpu"), 0)
    result = checkpoint_planner_of(wrapped).plan
    assert (result.count(None), result.count("recompute"), result.count("offload")) == (1, 2, 0)
    budget = estimate_peak_bytes([stack], [(1, 1, 1)], fixed, loss)  # enough only with one layer offloaded
    with pytest.raises(ValueError, match="needs with every decoder layer recomputed"):
        loss_and_grads(planned(model, budget, HostOffloader(emulate_on_cpu=True)), make_batch("cpu"), 0)


@pytest.mark.filterwarnings("ignore:lightning_fastft. cuda_graphs needs CUDA tensors")
def test_under_cuda_graphs_the_plan_recomputes_rather_than_offloads():
    """An offloaded layer runs without its CUDA graphs: under cuda_graphs the plan recomputes where a
    plan without offload fits (fewer layers without checkpointing), and offloads only where none fits."""
    from lightning_fastft.training.cuda_graphs import apply_cuda_graphs

    model = lora_llama()
    stack, fixed, loss = probe(model)
    cases = [((2, 0, 1), False, (2, 0, 1)), ((2, 0, 1), True, (1, 2, 0)), ((1, 1, 1), True, (1, 1, 1))]
    for budget_counts, graphed, counts in cases:
        wrapped = planned(model, estimate_peak_bytes([stack], [budget_counts], fixed, loss), HostOffloader(emulate_on_cpu=True))
        if graphed:
            apply_cuda_graphs(wrapped)
        loss_and_grads(wrapped, make_batch("cpu"), 0)
        result = checkpoint_planner_of(wrapped).plan
        assert (result.count(None), result.count("recompute"), result.count("offload")) == counts, (budget_counts, graphed)


def test_plans_again_when_batches_grow():
    model = lora_llama()
    stack, fixed, loss = probe(model)
    doubled = StackMemory(3, 2 * stack.saved_bytes, 2 * stack.input_bytes)  # twice the rows: exactly twice
    wrapped = planned(model, estimate_peak_bytes([doubled], [(1, 2, 0)], fixed, 2 * loss))
    loss_and_grads(wrapped, make_batch("cpu"), 0)
    planner = checkpoint_planner_of(wrapped)
    first = planner.plan
    assert (first.tokens, first.count(None)) == (BATCH * SEQ, 3)
    loss_and_grads(wrapped, {name: value[:1] for name, value in make_batch("cpu").items()}, 1)
    assert planner.plan is first  # fewer tokens: the plan holds
    twice = {name: torch.cat([value, value]) for name, value in make_batch("cpu").items()}
    loss_and_grads(wrapped, twice, 2)
    assert planner.measured[0] == doubled
    assert (planner.plan.tokens, planner.plan.count(None), planner.plan.count("recompute")) == (2 * BATCH * SEQ, 1, 2)
    with torch.no_grad():
        wrapped(**twice)  # no grad: no measurement, no plan
    remove_activation_checkpointing(wrapped)
    assert checkpoint_planner_of(wrapped) is None and "forward" not in wrapped.base_model.model.model.layers[0].__dict__


def test_default_budget(device):
    model = lora_llama().to(device)
    apply_activation_checkpointing(model, "auto")
    if device == "cpu":
        with pytest.raises(ValueError, match="checkpointing='auto' on a cpu device needs memory_budget_gib"):
            loss_and_grads(model, make_batch(device), 0)
    else:
        free, total = torch.cuda.mem_get_info()
        loss_and_grads(model, make_batch(device), 0)
        planner = checkpoint_planner_of(model)
        assert planner.plan.count(None) == 3
        assert planner.budget_bytes <= free + torch.cuda.memory_reserved() - total // 10


def test_patched_model_under_auto_matches_plain_training():
    """Through patch_model (fused kernels, Triton interpreter): the plan the budget asks for, equal grads."""
    from lightning_fastft.patching import patch_model

    model = lora_llama()
    reference = copy.deepcopy(model)
    patch_model(reference)
    stack, fixed, loss = probe(reference)
    assert loss == 3 * BATCH * SEQ * 36 * 4 + BATCH * SEQ * 101 * 4 + 4 * BATCH * SEQ  # fused linear cross-entropy
    wrapped = copy.deepcopy(model)
    budget = estimate_peak_bytes([stack], [(2, 1, 0)], fixed, loss)
    patch_model(wrapped, checkpointing="auto", memory_budget_gib=budget / GIB)
    assert_same_training(reference, wrapped, "cpu", steps=2)
    result = checkpoint_planner_of(wrapped).plan
    assert (result.count(None), result.count("recompute")) == (2, 1)


def test_lightning_fit_plans_and_metrics_count_the_recomputed_share(tmp_path):
    import lightning.pytorch as pl
    from helpers import quiet_trainer

    from lightning_fastft import FastFTMetrics
    from lightning_fastft.callbacks.metrics import flops_coefficients

    model = lora_llama()
    stack, fixed, loss = probe(model)

    class TinyLM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = copy.deepcopy(model)

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    budget_gib = estimate_peak_bytes([stack], [(2, 1, 0)], fixed, loss) / GIB
    metrics = FastFTMetrics()
    module = TinyLM()
    trainer = quiet_trainer("cpu", max_steps=2, default_root_dir=tmp_path, callbacks=[
        ActivationCheckpointing("auto", memory_budget_gib=budget_gib), metrics])  # fmt: skip
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([make_batch("cpu")] * 2, batch_size=None))
    plan = checkpoint_planner_of(module).plan
    assert (plan.count(None), plan.count("recompute")) == (2, 1)
    assert metrics.checkpoint_fraction == plan.checkpoint_fraction == 1 / 3
    assert metrics.throughput.flops_coefficients == flops_coefficients(module, 1 / 3)


def test_hf_trainer_callback_counts_the_auto_plan_in_mfu(tmp_path):
    """FastFTCallback (HF Trainer) reads the recomputed share again once checkpointing="auto" has
    planned: MFU counts the recomputed layer of the plan, not the none-yet of before the first step.
    The budget comes from the prepared (patched) model's own measure: its layers save other tensors
    than Hugging Face's (and other ones again where the kernels run their PyTorch reference)."""
    from transformers import Trainer, TrainingArguments

    from lightning_fastft.callbacks.metrics import checkpoint_fraction_of, flops_coefficients
    from lightning_fastft.integrations.hf import FastFTCallback, prepare_model

    model = lora_llama()
    measured = prepare_model(copy.deepcopy(model), checkpointing="auto", memory_budget_gib=2**50 / GIB)
    loss_and_grads(measured, make_batch("cpu"), 0)
    planner = checkpoint_planner_of(measured)
    stack, fixed, loss = planner.measured[0], planner.plan.fixed_bytes, loss_workspace_bytes(measured, BATCH * SEQ)
    budget_gib = estimate_peak_bytes([stack], [(2, 1, 0)], fixed, loss) / GIB
    model = prepare_model(copy.deepcopy(model), checkpointing="auto", memory_budget_gib=budget_gib)
    assert checkpoint_fraction_of(model) == 0  # no plan before the first training forward
    batch = make_batch("cpu")
    rows = [{name: tensor[i] for name, tensor in batch.items()} for i in range(BATCH)] * 2
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=2, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0,
    )  # fmt: skip
    callback = FastFTCallback(peak_flops=1e12)
    collate = lambda samples: {name: torch.stack([s[name] for s in samples]) for name in samples[0]}  # noqa: E731
    trainer = callback.attach(Trainer(model=model, args=args, train_dataset=rows, data_collator=collate))
    trainer.train()
    plan = checkpoint_planner_of(model).plan
    assert (plan.count(None), plan.count("recompute")) == (2, 1)
    assert callback.throughput.flops_coefficients == flops_coefficients(model, 1 / 3)
    assert callback.throughput.flops_coefficients != flops_coefficients(model, 0.0)
