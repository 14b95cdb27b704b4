"""lightning_fastft.integrations.hf with the real ``transformers.Trainer`` on CPU (tiny random Llama)."""

import copy
from pathlib import Path

import pytest
import torch
from tiny_models import PACKING_VOCAB, packing_lm, patching_lora
from torch import nn
from transformers import Trainer, TrainingArguments

from lightning_fastft.integrations.hf import (
    FastFTCallback,
    is_prepared,
    patch_report,
    prepare_model,
)
from lightning_fastft.patching.model import InstanceForward
from lightning_fastft.training.checkpointing import (
    checkpointed_layers,
    hf_gradient_checkpointing_on,
)

BATCH, ACCUMULATE, STEPS = 2, 2, 10
EXAMPLES_ASSETS = Path(__file__).resolve().parents[1] / "examples" / "assets"


def _dataset(n: int) -> list[dict]:
    """``n`` sequences of 2..9 tokens: micro-batches of unequal token counts."""
    generator = torch.Generator().manual_seed(1234)
    lengths = torch.randint(2, 10, (n,), generator=generator).tolist()
    return [{"input_ids": torch.randint(0, PACKING_VOCAB, (length,), generator=generator)} for length in lengths]


def _collate(samples: list[dict]) -> dict:
    """Right-pad to the longest sample; padding is masked and ignored by the loss."""
    longest = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.zeros(len(samples), longest, dtype=torch.long)
    attention_mask = torch.zeros(len(samples), longest, dtype=torch.long)
    for row, sample in enumerate(samples):
        input_ids[row, : len(sample["input_ids"])] = sample["input_ids"]
        attention_mask[row, : len(sample["input_ids"])] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _train(model, tmp_path, callbacks=(), steps=STEPS, attach=None, **arg_overrides):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATE,
        max_steps=steps,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **arg_overrides,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_dataset(steps * BATCH * ACCUMULATE),
        data_collator=_collate,
        callbacks=list(callbacks),
    )
    if attach is not None:
        attach.attach(trainer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses


def _models(lora: bool):
    """Two identical tiny one-layer Llamas (or PEFT LoRA models): (plain, to be prepared)."""
    model = packing_lm("llama", num_hidden_layers=1)
    if lora:
        model = patching_lora(model)
    return copy.deepcopy(model), model


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_trainer_losses_match_plain_hf_with_accumulation(lora, tmp_path):
    plain, fast = _models(lora)
    fast = prepare_model(fast)
    seen_num_items = []
    hf_model = next(
        m for m in fast.modules() if isinstance(m.__dict__.get("forward"), InstanceForward) and hasattr(m, "lm_head")
    )
    hf_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen_num_items.append(kwargs.get("num_items_in_batch")),
        with_kwargs=True,
    )

    _, plain_losses = _train(plain, tmp_path / "plain")
    _, fast_losses = _train(fast, tmp_path / "fast", callbacks=[FastFTCallback()])

    assert len(plain_losses) == STEPS
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(plain_losses), rtol=1e-5, atol=0)
    # the Trainer handed the patched forward the window's target-token count (token-exact accumulation)
    assert len(seen_num_items) == STEPS * ACCUMULATE and all(n is not None for n in seen_num_items)
    assert len({int(n) for n in seen_num_items}) > 1  # the windows really differ in token count
    for (name, p_plain), (_, p_fast) in zip(plain.named_parameters(), fast.named_parameters()):
        torch.testing.assert_close(p_fast, p_plain, rtol=1e-4, atol=1e-6, msg=name)


def test_callback_logs_tokens_per_sec(tmp_path):
    _, model = _models(lora=False)
    model = prepare_model(model)
    callback = FastFTCallback(window=100, peak_flops=1e12)
    trainer, _ = _train(model, tmp_path, attach=callback, steps=3)

    step_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(step_logs) == 3
    for entry in step_logs:
        assert entry["tokens_per_sec"] > 0 and entry["tokens_per_sec_total"] >= entry["tokens_per_sec"]
        assert 0 < entry["mfu"] < 1  # with the peak given; without it a CPU has none (test_unprepared_model_warns)
        assert ("peak_mem_gib" in entry) == torch.cuda.is_available()
    # attached, it runs before the reporting callbacks, so they get the metrics too
    assert trainer.callback_handler.callbacks[0] is callback
    # every non-padding token of the 3 steps was counted
    data = _dataset(3 * BATCH * ACCUMULATE)
    counted = sum(batch[0] for _, batches in callback.throughput.steps for batch in batches)
    assert counted == sum(len(sample["input_ids"]) for sample in data)
    assert sum(len(batches) for _, batches in callback.throughput.steps) == 3 * ACCUMULATE


def test_model_is_patched_and_checkpointed(tmp_path):
    _, model = _models(lora=True)
    model = prepare_model(model, checkpointing="recompute")
    report = patch_report(model)
    assert report is model.fastft_patch_report and len(report.models) == 1
    entry = report.models[0]
    assert entry.patched["rms_norm"] == 3 and entry.patched["cross_entropy"] == 1
    assert entry.patched["lora_qkv"] == 1 and entry.patched["lora_mlp"] == 1
    assert is_prepared(model)
    llama = model.get_base_model()
    assert isinstance(llama.__dict__["forward"], InstanceForward)
    assert isinstance(llama.model.layers[0].mlp.__dict__["forward"], InstanceForward)
    assert checkpointed_layers(model) == list(llama.model.layers)

    # HF's gradient checkpointing asked for in TrainingArguments is not added on top of ours
    with pytest.warns(UserWarning, match="already checkpointed by lightning_fastft"):
        _, losses = _train(
            model,
            tmp_path,
            callbacks=[FastFTCallback()],
            steps=1,
            gradient_checkpointing=True,
        )
    assert not hf_gradient_checkpointing_on(model)
    assert checkpointed_layers(model) == list(llama.model.layers)
    assert len(losses) == 1 and all(torch.isfinite(torch.tensor(losses)))


def test_hf_checkpointing_already_on_is_replaced():
    _, model = _models(lora=False)
    model = packing_lm("llama")  # two layers: checkpoint_fraction 0.5 wraps the second
    model.gradient_checkpointing_enable()
    assert hf_gradient_checkpointing_on(model)
    with pytest.warns(UserWarning, match="switched off"):
        prepare_model(model, checkpointing="recompute", checkpoint_fraction=0.5)
    assert not hf_gradient_checkpointing_on(model)
    assert checkpointed_layers(model) == [model.model.layers[1]]


def test_unprepared_model_warns(tmp_path):
    _, model = _models(lora=False)
    with pytest.warns(UserWarning, match="runs no lightning_fastft patch"):
        trainer, _ = _train(model, tmp_path, callbacks=[FastFTCallback()], steps=1)
    assert "tokens_per_sec" in trainer.state.log_history[0]
    assert "mfu" not in trainer.state.log_history[0]  # no peak FLOP/s known for a CPU


def test_bad_inputs_raise():
    _, model = _models(lora=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'flash'"):
        prepare_model(model, flash=True)
    with pytest.raises(ValueError, match="checkpointing must be one of"):
        prepare_model(model, checkpointing="gpu")
    with pytest.raises(ValueError, match="checkpoint_fraction"):
        prepare_model(model, checkpointing="recompute", checkpoint_fraction=0)
    with pytest.raises(TypeError, match="must be True or False"):
        prepare_model(model, rope="false")
    assert not is_prepared(model)  # nothing was patched by the rejected calls
    with pytest.raises(TypeError, match="expects a transformers causal LM"):
        prepare_model("meta-llama/Llama-3.2-1B")
    with pytest.raises(TypeError, match="no transformers causal LM"):
        prepare_model(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="peak_flops"):
        FastFTCallback(peak_flops=0)
    with pytest.raises(ValueError, match="checkpoint_fraction"):
        FastFTCallback(checkpoint_fraction=1.5)
    with pytest.raises(ValueError, match="window"):
        FastFTCallback(window=0)


def test_sft_trainer_losses_match_plain_sft_trainer(tmp_path):
    """TRL's SFTTrainer, prepared before the trainer is built (SFTTrainer then wraps the patched
    forward with its own fused LM head), trains with the losses of a plain SFTTrainer."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(EXAMPLES_ASSETS)  # its pad id (0) only: the data is tokenised
    data = Dataset.from_list([{"input_ids": sample["input_ids"].tolist()} for sample in _dataset(6 * BATCH * ACCUMULATE)])

    def train(model, out, callback=None):
        args = SFTConfig(
            output_dir=str(out),
            per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=ACCUMULATE,
            max_steps=6,
            learning_rate=1e-3,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
            dataloader_num_workers=0,
            max_length=None,
            bf16=False,  # SFTConfig's default is bf16 autocast: compare in fp32
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        if callback is not None:
            callback.attach(trainer)
        trainer.train()
        return [entry for entry in trainer.state.log_history if "loss" in entry]

    plain, fast = _models(lora=True)
    fast = prepare_model(fast, checkpointing="recompute")
    plain_logs = train(plain, tmp_path / "plain")
    fast_logs = train(fast, tmp_path / "fast", FastFTCallback())

    assert is_prepared(fast) and len(plain_logs) == 6
    torch.testing.assert_close(
        torch.tensor([e["loss"] for e in fast_logs]), torch.tensor([e["loss"] for e in plain_logs]), rtol=1e-5, atol=0
    )
    assert all(e["tokens_per_sec"] > 0 for e in fast_logs)
