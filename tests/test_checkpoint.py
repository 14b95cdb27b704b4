"""Adapter-only checkpoints: small files, exact resume, strict checks on what is missing."""

import lightning.pytorch as pl
import pytest
import torch
from helpers import NO_PATCHES, RecordLosses, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_fastft.module import CausalLMFineTune, SyntheticCausalLMDataModule
from lightning_fastft.strategies import FastFTStrategy

STEPS_PER_EPOCH = 3


def _fit(device, tmp_path, epochs, adapter_only=True, ckpt_path=None, name="run"):
    pl.seed_everything(7)  # the frozen base weights are drawn from this seed in every run
    module = CausalLMFineTune(lora_r=2, lora_alpha=4, learning_rate=1e-2)
    data = SyntheticCausalLMDataModule(batch_size=2, seq_len=12, num_samples=2 * STEPS_PER_EPOCH, seed=3)
    losses = RecordLosses()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / name, save_top_k=-1, every_n_epochs=1)
    trainer = quiet_trainer(
        device,
        strategy=FastFTStrategy(adapter_only_checkpoint=adapter_only, **NO_PATCHES),
        max_epochs=epochs,
        callbacks=[losses, checkpoint],
        enable_checkpointing=True,
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, losses.losses, sorted((tmp_path / name).glob("*.ckpt"))


def test_resume_from_adapter_checkpoint_matches_uninterrupted_run(device, tmp_path):
    _, uninterrupted, _ = _fit(device, tmp_path, epochs=2, name="full_run")
    _, first_epoch, checkpoints = _fit(device, tmp_path, epochs=1, name="first")
    resumed_module, resumed, _ = _fit(device, tmp_path, epochs=2, ckpt_path=checkpoints[-1], name="resumed")

    assert first_epoch == pytest.approx(uninterrupted[:STEPS_PER_EPOCH], rel=1e-6)
    assert len(resumed) == STEPS_PER_EPOCH
    assert resumed == pytest.approx(uninterrupted[STEPS_PER_EPOCH:], rel=1e-6)

    checkpoint = torch.load(checkpoints[-1], weights_only=False)
    trainable = {n for n, p in resumed_module.named_parameters() if p.requires_grad}
    assert set(checkpoint["state_dict"]) == trainable
    assert trainable and all("lora_" in name for name in trainable)
    assert checkpoint["optimizer_states"][0]["state"]  # optimizer state travels with the adapters


def test_adapter_checkpoint_much_smaller_than_full(device, tmp_path):
    _, _, adapter_files = _fit(device, tmp_path, epochs=1, name="adapter")
    _, _, full_files = _fit(device, tmp_path, epochs=1, adapter_only=False, name="full")
    assert adapter_files[-1].stat().st_size < 0.3 * full_files[-1].stat().st_size


def test_loading_reports_missing_trainable_weights(device, tmp_path):
    module, _, checkpoints = _fit(device, tmp_path, epochs=1, name="strict")
    checkpoint = torch.load(checkpoints[-1], weights_only=False)
    dropped = next(iter(checkpoint["state_dict"]))
    del checkpoint["state_dict"][dropped]
    broken = tmp_path / "broken.ckpt"
    torch.save(checkpoint, broken)
    with pytest.raises(RuntimeError, match="missing trainable weights"):
        _fit(device, tmp_path, epochs=2, ckpt_path=broken, name="broken")


def _weights(module):
    return {name: p.detach().cpu() for name, p in module.named_parameters()}


def test_load_from_checkpoint_rebuilds_the_random_base_of_an_adapter_checkpoint(device, tmp_path):
    trained, _, checkpoints = _fit(device, tmp_path, epochs=1, name="reload")
    saved = torch.load(checkpoints[-1], weights_only=False)["state_dict"]
    assert saved and all("lora_" in key for key in saved)

    torch.manual_seed(12345)  # the base comes from the stored init_seed, not from the current random state
    reloaded = CausalLMFineTune.load_from_checkpoint(checkpoints[-1])
    expected, got = _weights(trained), _weights(reloaded)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_random_base_is_drawn_on_the_cpu_whatever_the_init_device():
    """Under a strategy's device context (e.g. CUDA) a config-built base is still drawn on the CPU,
    so load_from_checkpoint rebuilds it bit for bit on any machine (the CUDA generator draws other
    numbers for the same seed); the meta device stands in for that context here."""
    on_cpu = CausalLMFineTune(lora_r=4, init_seed=7)
    on_cpu.configure_model()
    under_context = CausalLMFineTune(lora_r=4, init_seed=7)
    with torch.device("meta"):
        under_context.configure_model()
    expected, got = _weights(on_cpu), _weights(under_context)
    assert expected and got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


class _FreezeLoRAAAfterFirstEpoch(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            for name, param in pl_module.named_parameters():
                if "lora_A" in name:
                    param.requires_grad_(False)


def test_weights_trained_then_frozen_stay_in_adapter_checkpoints(device, tmp_path):
    pl.seed_everything(7)
    module = CausalLMFineTune(lora_r=2, lora_alpha=4, learning_rate=1e-2)
    module.configure_model()
    initial_lora_a = {n: p.detach().clone() for n, p in module.named_parameters() if "lora_A" in n}
    data = SyntheticCausalLMDataModule(batch_size=2, seq_len=12, num_samples=2 * STEPS_PER_EPOCH, seed=3)
    trainer = quiet_trainer(
        device, strategy=FastFTStrategy(**NO_PATCHES), max_epochs=2, callbacks=[_FreezeLoRAAAfterFirstEpoch()]
    )
    trainer.fit(module, data)
    path = tmp_path / "frozen_later.ckpt"
    trainer.save_checkpoint(path)

    saved = torch.load(path, weights_only=False)["state_dict"]
    assert initial_lora_a and initial_lora_a.keys() <= saved.keys()  # frozen now, but trained in the first epoch
    assert all("lora_" in key for key in saved)
    reloaded = _weights(CausalLMFineTune.load_from_checkpoint(path))
    for name, initial in initial_lora_a.items():
        assert not torch.equal(reloaded[name], initial.cpu()), name
        torch.testing.assert_close(reloaded[name], _weights(module)[name], rtol=0, atol=0)
