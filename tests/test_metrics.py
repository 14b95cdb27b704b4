"""FastFTMetrics: tokens/s, MFU and peak memory reach the loggers and the progress bar."""

import copy
import csv
import warnings
from pathlib import Path

import pytest
import torch
from helpers import NO_PATCHES, quiet_trainer
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch.utils.data import DataLoader

from lightning_fastft.callbacks import FastFTMetrics
from lightning_fastft.callbacks.metrics import flops_coefficients, peak_flops_for, recomputed_share
from lightning_fastft.data.packing import PackedCollator
from lightning_fastft.module import TINY_LLAMA_CONFIG, CausalLMFineTune, SyntheticCausalLMDataModule, build_causal_lm
from lightning_fastft.strategies import FastFTStrategy

PEAK = 1e12
STEPS = 3


def _fit(device, logger, lora_r=0, checkpointing=None, data=None):
    module = CausalLMFineTune(lora_r=lora_r)
    if data is None:
        data = SyntheticCausalLMDataModule(batch_size=2, seq_len=10, num_samples=2 * STEPS, seed=5)
    trainer = quiet_trainer(
        device,
        strategy=FastFTStrategy(checkpointing=checkpointing, **NO_PATCHES),
        max_steps=STEPS,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[FastFTMetrics(peak_flops=PEAK, window=2)],
    )
    trainer.fit(module, data)
    return module, data, trainer


def _lm_sizes(module):
    model = module.model
    embedding = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total - embedding, trainable


def test_flops_formula_full_lora_and_recompute():
    config = TINY_LLAMA_CONFIG
    attention = config["num_hidden_layers"] * config["hidden_size"]  # heads x head_dim = hidden here
    full = CausalLMFineTune()
    full.configure_model()
    n_matmul, _ = _lm_sizes(full)
    assert flops_coefficients(full) == (6.0 * n_matmul, 12.0 * attention)
    assert flops_coefficients(full, recompute=True) == (8.0 * n_matmul, 16.0 * attention)

    lora = CausalLMFineTune(lora_r=4)
    lora.configure_model()
    n_total, n_lora = _lm_sizes(lora)
    assert 0 < n_lora < n_total / 5
    assert flops_coefficients(lora) == (4.0 * n_total + 2.0 * n_lora, 12.0 * attention)
    assert flops_coefficients(torch.nn.Linear(2, 2)) is None


def test_flops_count_the_recomputed_share_of_layers():
    module = CausalLMFineTune(lora_r=4)
    module.configure_model()
    without, full = flops_coefficients(module, recompute=False), flops_coefficients(module, recompute=True)
    assert flops_coefficients(module, recompute=1.0) == full and flops_coefficients(module, recompute=0.0) == without
    half = flops_coefficients(module, recompute=0.5)
    for low, middle, high in zip(without, half, full):
        assert low < middle < high and middle == pytest.approx((low + high) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="recompute"):
        flops_coefficients(module, recompute=1.5)


def test_recomputed_share_read_from_the_model():
    from lightning_fastft.training.checkpointing import apply_activation_checkpointing, remove_activation_checkpointing

    model = build_causal_lm({**TINY_LLAMA_CONFIG, "num_hidden_layers": 4})
    assert recomputed_share(model) == 0.0
    apply_activation_checkpointing(model, "recompute", checkpoint_fraction=0.5)
    assert recomputed_share(model) == 0.5
    apply_activation_checkpointing(model, "offload", checkpoint_fraction=1.0)
    assert recomputed_share(model) == 1.0
    remove_activation_checkpointing(model)
    model.gradient_checkpointing_enable()  # HF's own checkpointing recomputes every layer
    assert recomputed_share(model) == 1.0


def test_flops_count_the_logical_weights_of_4bit_layers():
    bnb = pytest.importorskip("bitsandbytes")
    from lightning_fastft.qlora import attach_lora, prepare_qlora

    base = build_causal_lm(TINY_LLAMA_CONFIG)
    unquantized = attach_lora(copy.deepcopy(base), lora_r=4)
    quantized = prepare_qlora(base, lora_r=4)
    packed = [m.weight for m in quantized.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert packed and all(w.numel() < w.quant_state.shape.numel() for w in packed)  # 2 weights per byte
    assert flops_coefficients(quantized) == flops_coefficients(unquantized)


def test_peak_flops_table():
    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for("NVIDIA H200") == 989e12
    assert peak_flops_for("NVIDIA L40S") == 362e12
    assert peak_flops_for("NVIDIA L4") == 121e12
    assert peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for("Some CPU") is None


def test_metrics_in_csv_logger_and_progress_bar(device, tmp_path):
    module, data, trainer = _fit(device, CSVLogger(tmp_path))
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("tokens_per_sec")]
    assert len(rows) == STEPS
    fixed, per_position = flops_coefficients(module)
    seq_len = data.hparams.seq_len
    for row in rows:
        non_pad, total, mfu = float(row["tokens_per_sec"]), float(row["tokens_per_sec_total"]), float(row["mfu"])
        assert 0 < non_pad < total  # the synthetic rows are padded
        assert mfu == pytest.approx(total * (fixed + per_position * seq_len) / PEAK, rel=1e-4)
    for key in ("tokens_per_sec", "tokens_per_sec_total", "mfu"):
        assert key in trainer.progress_bar_metrics
    if device == "cuda":
        assert 0 < trainer.progress_bar_metrics["peak_mem_gib"] < 80
        assert all(float(r["peak_mem_gib"]) > 0 for r in rows)


def test_metrics_in_wandb_offline_run(device, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is in the dev extra; the GPU image lacks it")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # no console capture: the test reads metrics, not output
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="fastft-test")
    _, _, trainer = _fit(device, logger, lora_r=2, checkpointing="recompute")
    run_files = Path(logger.experiment.dir).parent  # .../wandb/offline-run-*/
    summary = dict(logger.experiment.summary)
    logger.experiment.finish()
    wandb.teardown()  # stop wandb's service and its threads: later tests share this process
    assert {"tokens_per_sec", "tokens_per_sec_total", "mfu", "train_loss"} <= summary.keys()
    assert summary["mfu"] > 0 and summary["tokens_per_sec"] > 0
    assert run_files.name.startswith("offline-run-") and list(run_files.glob("*.wandb"))
    metrics = next(c for c in trainer.callbacks if isinstance(c, FastFTMetrics))
    assert metrics.recompute == 1.0  # read from the model the strategy checkpointed


def test_packed_batches_count_real_tokens_without_logger(device):
    # lengths 9 and 5 with max_seq_len 12 pack into two rows padded to 16: 14 real of 32 tokens
    samples = [{"input_ids": torch.randint(1, 128, (length,))} for _ in range(STEPS) for length in (9, 5)]
    loader = DataLoader(samples, batch_size=2, collate_fn=PackedCollator(max_seq_len=12, pad_to_multiple_of=8))
    batch = next(iter(loader))
    assert "attention_mask" not in batch and batch["num_real_tokens"] == 14 and batch["input_ids"].numel() == 32
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, trainer = _fit(device, logger=False, data=loader)
    assert not [w for w in caught if "no logger configured" in str(w.message)]
    metrics = trainer.progress_bar_metrics
    assert metrics["tokens_per_sec"] / metrics["tokens_per_sec_total"] == pytest.approx(14 / 32, rel=1e-5)
