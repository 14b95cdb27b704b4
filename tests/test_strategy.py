"""The fastft strategies: registration, patch order, token-exact accumulation, 8-bit AdamW."""

import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers import NO_PATCHES, quiet_trainer
from lightning.pytorch.strategies import StrategyRegistry
from torch.utils.data import DataLoader, Dataset

import lightning_fastft
from lightning_fastft import patching
from lightning_fastft.callbacks import FastFT
from lightning_fastft.module import TINY_LLAMA_CONFIG, CausalLMFineTune
from lightning_fastft.training.optim import convert_optimizers, to_8bit_adamw
from lightning_fastft.training.checkpointing import checkpointed_layers
from lightning_fastft.strategies import FastFTDDPStrategy, FastFTFSDPStrategy, FastFTStrategy
from lightning_fastft.training.token_exact import count_target_tokens

class _Batches(Dataset):
    """A dataset whose items are ready-made batches (use with ``batch_size=None``)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        return self.batches[index]


def _loader(batches):
    return DataLoader(_Batches(batches), batch_size=None)


def _random_batch(rows, length, pad):
    """``rows`` x ``length`` random tokens, the last ``pad[i]`` positions of row i padded."""
    input_ids = torch.randint(1, TINY_LLAMA_CONFIG["vocab_size"], (rows, length))
    attention_mask = torch.ones(rows, length, dtype=torch.long)
    for row, n_pad in enumerate(pad):
        if n_pad:
            attention_mask[row, -n_pad:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids * attention_mask, "attention_mask": attention_mask, "labels": labels}


def _padded_concat(batches):
    """One batch holding every row of ``batches``, right-padded to the longest."""
    length = max(b["input_ids"].shape[1] for b in batches)
    pad_value = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {
        key: torch.cat([torch.nn.functional.pad(b[key], (0, length - b[key].shape[1]), value=v) for b in batches])
        for key, v in pad_value.items()
    }


class _SGDFineTune(CausalLMFineTune):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.learning_rate)


def test_strategy_names_registered_and_import_twice():
    import importlib

    importlib.reload(lightning_fastft)
    lightning_fastft.register_strategies()
    for name in ("fastft", "fastft_ddp", "fastft_ddp_spawn", "fastft_fsdp"):
        assert name in StrategyRegistry
    assert StrategyRegistry["fastft_ddp"]["strategy"] is FastFTDDPStrategy
    assert StrategyRegistry["fastft_fsdp"]["strategy"] is FastFTFSDPStrategy
    trainer = pl.Trainer(strategy="fastft", accelerator="cpu", logger=False)
    assert isinstance(trainer.strategy, FastFTStrategy)
    assert trainer.strategy.root_device == torch.device("cpu")
    with pytest.raises(ValueError):
        FastFTStrategy(checkpointing="sometimes")
    with pytest.raises(ValueError):
        FastFTStrategy(optimizer="lion")
    for fraction in (0, 1.5):
        with pytest.raises(ValueError, match="checkpoint_fraction"):
            FastFTStrategy(checkpointing="recompute", checkpoint_fraction=fraction)
        with pytest.raises(ValueError, match="checkpoint_fraction"):
            FastFT(checkpointing="recompute", checkpoint_fraction=fraction)


def test_count_target_tokens():
    labels = torch.tensor([[5, 6, -100, 7], [-100, 1, 2, -100]])
    assert count_target_tokens({"labels": labels}) == 4  # shifted: [6, -100, 7] and [1, 2, -100]
    assert count_target_tokens({"labels": labels, "shift_labels": labels}) == 5
    assert count_target_tokens({"input_ids": labels}) is None
    assert count_target_tokens(labels) is None


def test_patches_applied_before_optimizers(device, monkeypatch):
    """setup() patches and checkpoints the model before Lightning builds optimizers."""
    from lightning_fastft.patching import model as patching_model

    seen = {}
    real_patch_model, real_checkpointing = patching.patch_model, patching_model.apply_activation_checkpointing

    def recording_patch_model(model, **switches):
        seen["optimizers_at_patch_time"] = list(trainer.strategy.optimizers)
        seen["switches"] = switches
        return real_patch_model(model, **switches)

    def recording_checkpointing(model, checkpointing, checkpoint_fraction, **options):
        seen["optimizers_at_checkpointing_time"] = list(trainer.strategy.optimizers)
        seen["checkpointed_layers"] = real_checkpointing(
            model, checkpointing, checkpoint_fraction=checkpoint_fraction, **options
        )
        seen["checkpointing"] = checkpointing
        return seen["checkpointed_layers"]

    monkeypatch.setattr(patching, "patch_model", recording_patch_model)
    monkeypatch.setattr(patching_model, "apply_activation_checkpointing", recording_checkpointing)
    module = CausalLMFineTune()
    trainer = quiet_trainer(device, max_steps=1, strategy=FastFTStrategy(rope=False, checkpointing="recompute"))
    trainer.fit(module, _loader([_random_batch(2, 7, [0, 2])]))

    assert seen["optimizers_at_patch_time"] == [] and seen["optimizers_at_checkpointing_time"] == []
    assert seen["switches"] == dict(
        rms_norm=True, rope=False, mlp=True, cross_entropy=True, fused_lora=True,
        checkpointing="recompute", checkpoint_fraction=1.0, memory_budget_gib=None, cuda_graphs=False,
    )  # fmt: skip
    report = trainer.strategy.patch_report.models[0]
    assert report.patched["rms_norm"] > 0 and report.patched["cross_entropy"] == 1
    assert seen["checkpointing"] == "recompute" and seen["checkpointed_layers"] == list(module.model.model.layers)
    assert "forward" in module.model.model.norm.__dict__  # patched on the instance
    assert len(trainer.optimizers) == 1


@pytest.mark.parametrize("patch_with", ["strategy", "callback"])
def test_checkpoint_fraction_reaches_the_model(device, patch_with):
    """``checkpoint_fraction=0.5`` on 4 layers: layers 1 and 3 checkpointed, 0 and 2 plain."""
    module = CausalLMFineTune(model={**TINY_LLAMA_CONFIG, "num_hidden_layers": 4})
    options = dict(checkpointing="recompute", checkpoint_fraction=0.5)
    if patch_with == "strategy":
        trainer = quiet_trainer(device, max_steps=1, strategy=FastFTStrategy(**NO_PATCHES, **options))
    else:
        trainer = quiet_trainer(device, max_steps=1, callbacks=[FastFT(**NO_PATCHES, **options)])
    trainer.fit(module, _loader([_random_batch(2, 7, [0, 2])]))
    layers = module.model.model.layers
    assert checkpointed_layers(module) == [layers[1], layers[3]]


def test_fastft_callback_patches_model_built_in_configure_model(device):
    module = CausalLMFineTune()
    callback = FastFT(mlp=False)
    trainer = quiet_trainer(device, max_steps=1, callbacks=[callback])
    trainer.fit(module, _loader([_random_batch(2, 6, [1, 0])]))
    report = callback.patch_report.models[0]
    assert report.patched["rms_norm"] > 0 and report.patched["mlp"] == 0
    assert "forward" in module.model.model.norm.__dict__
    assert "forward" not in module.model.model.layers[0].mlp.__dict__


@pytest.mark.parametrize("gradient_clip_val", [None, 0.05])
def test_token_exact_accumulation_matches_one_big_batch(device, gradient_clip_val):
    """k=3 micro-batches of unequal token counts == one batch holding all of them.

    Compared after one SGD step: the (clipped) gradients left on the parameters and the weights.
    """
    micro_batches = [_random_batch(2, 5, [0, 3]), _random_batch(1, 9, [2]), _random_batch(3, 4, [0, 1, 0])]
    big_batch = _padded_concat(micro_batches)

    def fit(batches, accumulate, token_exact=True):
        torch.manual_seed(1234)  # same initial weights in every run
        module = _SGDFineTune(learning_rate=1.0)
        strategy = FastFTStrategy(token_exact=token_exact, **NO_PATCHES)
        trainer = quiet_trainer(
            device,
            max_steps=1,
            strategy=strategy,
            accumulate_grad_batches=accumulate,
            gradient_clip_val=gradient_clip_val,
        )
        trainer.fit(module, _loader(batches))
        return module, trainer

    accumulated, trainer = fit(micro_batches, accumulate=3)
    reference, _ = fit([big_batch], accumulate=1)
    plain_mean, _ = fit(micro_batches, accumulate=3, token_exact=False)

    for (name, p), q in zip(accumulated.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    grads = [p.grad for p in accumulated.parameters()]
    if gradient_clip_val is not None:  # clipping did bind, and after the token rescale
        assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) == pytest.approx(
            gradient_clip_val, rel=1e-4
        )
    plain_grads = [p.grad for p in plain_mean.parameters()]
    assert max((g - h).abs().max() / g.abs().max() for g, h in zip(grads, plain_grads)) > 1e-2

    # the logged loss is the last micro-batch's own mean, computed with the initial weights
    torch.manual_seed(1234)
    initial = _SGDFineTune()
    with torch.device(device):  # as Lightning's init context; a config-built base is drawn on the CPU anyway
        initial.configure_model()
    initial.to(device)  # as the strategy moves it
    with torch.no_grad():
        last_loss = initial(**{key: value.to(device) for key, value in micro_batches[-1].items()}).loss
    torch.testing.assert_close(trainer.callback_metrics["train_loss"].cpu(), last_loss.cpu(), rtol=1e-5, atol=1e-6)


def test_adamw_8bit_replaces_adamw_keeping_groups_and_scheduler(device):
    import bitsandbytes as bnb

    module = CausalLMFineTune(learning_rate=3e-3, weight_decay=0.1, betas=(0.8, 0.95), warmup_steps=4)
    strategy = FastFTStrategy(optimizer="adamw_8bit", **NO_PATCHES)
    trainer = quiet_trainer(device, strategy=strategy, max_steps=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*optimizer.step.*")  # schedulers see the new optimizer
        trainer.fit(module, _loader([_random_batch(2, 8, [0, 3]), _random_batch(2, 8, [1, 0])]))

    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert all(g["betas"] == (0.8, 0.95) for g in optimizer.param_groups)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.optimizer is optimizer
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-3 * 3 / 4)  # warm-up after 2 steps
    params = {id(p) for p in module.parameters()}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == params
    embedding = module.model.get_input_embeddings().weight
    assert optimizer.state[embedding]["state1"].dtype == torch.uint8


def test_to_8bit_adamw_with_injected_class():
    weight, bias = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(5))
    adamw = torch.optim.AdamW([{"params": [weight]}, {"params": [bias], "weight_decay": 0.0}], lr=0.1, eps=1e-6)
    scheduler = torch.optim.lr_scheduler.StepLR(adamw, step_size=1)

    scheduler_config = SimpleNamespace(scheduler=scheduler)  # stands for Lightning's LRSchedulerConfig
    sgd = torch.optim.SGD([weight], lr=0.1)
    with pytest.warns(UserWarning, match="keeps the torch.optim.sgd.SGD"):
        converted = convert_optimizers([adamw, sgd], [scheduler_config], "adamw_8bit", optimizer_class=torch.optim.Adam)
    assert type(converted[0]) is torch.optim.Adam and converted[1] is sgd
    assert [g["weight_decay"] for g in converted[0].param_groups] == [0.01, 0.0]
    assert converted[0].defaults["eps"] == 1e-6
    assert scheduler.optimizer is converted[0]
    assert to_8bit_adamw(sgd) is sgd
    with pytest.raises(ValueError):
        convert_optimizers([adamw], [], "adamw_4bit")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP needs CUDA")
def test_fsdp_strategy_lora_fit_and_adapter_checkpoint(tmp_path):
    import torch.distributed as dist

    module = CausalLMFineTune(lora_r=4)
    trainer = quiet_trainer("cuda", strategy="fastft_fsdp", max_steps=2)
    try:
        trainer.fit(module, _loader([_random_batch(2, 8, [0, 3]), _random_batch(2, 8, [1, 0])]))
        path = tmp_path / "fsdp.ckpt"
        trainer.save_checkpoint(path)
    finally:  # Lightning leaves the process group up; later tests start their own
        if dist.is_initialized():
            dist.destroy_process_group()
    state = torch.load(path, weights_only=False)["state_dict"]
    assert state and all("lora_" in key for key in state)


class _Classifier(pl.LightningModule):
    """Sequence classification: one label per row (shape ``(batch,)``), not token labels."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.head(batch["features"]), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def test_token_exact_falls_back_to_averaging_for_classification_labels(device):
    """Labels of shape (B,) with B=1 used to count 0 target tokens: zero gradient, nothing learnt."""
    batches = [{"features": torch.randn(1, 4), "labels": torch.tensor([label])} for label in (0, 2)]

    def gradient(token_exact):
        torch.manual_seed(5)
        module = _Classifier()
        trainer = quiet_trainer(
            device,
            max_steps=1,
            accumulate_grad_batches=2,
            strategy=FastFTStrategy(token_exact=token_exact, **NO_PATCHES),
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, _loader(batches))
        return module.head.weight.grad, [str(w.message) for w in caught if "token_exact" in str(w.message)]

    exact_grad, exact_warnings = gradient(token_exact=True)
    averaged_grad, averaged_warnings = gradient(token_exact=False)
    assert exact_grad.abs().max() > 0
    torch.testing.assert_close(exact_grad, averaged_grad)
    assert len(exact_warnings) == 1 and "token-level" in exact_warnings[0] and not averaged_warnings
    assert count_target_tokens({"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.tensor([1, 0])}) is None


def test_options_of_wrong_type_are_rejected_by_name():
    for option in ("token_exact", "adapter_only_checkpoint", "rms_norm", "fused_lora"):
        with pytest.raises(TypeError, match=f"{option} must be True or False, got 'false'"):
            FastFTStrategy(**{option: "false"})
    with pytest.raises(TypeError, match="cross_entropy must be True or False, got 0"):
        FastFT(cross_entropy=0)
    with pytest.raises(ValueError, match="checkpoint_fraction"):
        FastFT(checkpointing="recompute", checkpoint_fraction="0.5")


class _AdamFineTune(CausalLMFineTune):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)


def test_adamw_8bit_converts_adam_and_warns_about_other_optimizers(device):
    import bitsandbytes as bnb

    def fit_and_optimizer(module):
        trainer = quiet_trainer(device, strategy=FastFTStrategy(optimizer="adamw_8bit", **NO_PATCHES), max_steps=1)
        trainer.fit(module, _loader([_random_batch(2, 6, [0, 1])]))
        return trainer.optimizers[0]

    assert isinstance(fit_and_optimizer(_AdamFineTune()), bnb.optim.AdamW8bit)  # Adam without decay == AdamW
    with pytest.warns(UserWarning, match="keeps the torch.optim.sgd.SGD"):
        assert type(fit_and_optimizer(_SGDFineTune())) is torch.optim.SGD

    weight = torch.nn.Parameter(torch.randn(3, 2))
    coupled = torch.optim.Adam([weight], weight_decay=0.1)  # L2 decay: not AdamW's update rule
    decoupled = torch.optim.Adam([weight], weight_decay=0.1, decoupled_weight_decay=True)
    with pytest.warns(UserWarning, match="keeps the torch.optim.adam.Adam"):
        converted = convert_optimizers([coupled, decoupled], [], "adamw_8bit", optimizer_class=torch.optim.AdamW)
    assert converted[0] is coupled
    assert type(converted[1]) is torch.optim.AdamW and converted[1].defaults["weight_decay"] == 0.1


def test_fsdp_refuses_4bit_layers_with_a_clear_error():
    """QLoRA under fastft_fsdp: named refusal at setup instead of torch's "Cannot flatten integer dtype tensors"."""
    from test_qlora import tiny_llama

    from lightning_fastft.qlora import prepare_qlora

    class QLoRAModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = prepare_qlora(tiny_llama("cpu"), lora_r=4)

    strategy = FastFTFSDPStrategy()
    strategy._lightning_module = QLoRAModule()
    with pytest.raises(ValueError, match=r"fastft_fsdp: model\..*q_proj.* is a bitsandbytes 4-bit layer \(QLoRA\)"):
        strategy.setup(trainer=None)
