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
from lightning_fastft.callbacks.metrics import checkpoint_fraction_of, flops_coefficients, peak_flops_for
from lightning_fastft.data.packing import PackedCollator
from lightning_fastft.data import TINY_LLAMA_CONFIG, SyntheticCausalLMDataModule
from lightning_fastft.module import CausalLMFineTune, build_causal_lm
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
    assert flops_coefficients(full, checkpoint_fraction=1.0) == (8.0 * n_matmul, 16.0 * attention)

    lora = CausalLMFineTune(lora_r=4)
    lora.configure_model()
    n_total, n_lora = _lm_sizes(lora)
    assert 0 < n_lora < n_total / 5
    assert flops_coefficients(lora) == (4.0 * n_total + 2.0 * n_lora, 12.0 * attention)
    assert flops_coefficients(torch.nn.Linear(2, 2)) is None


def test_flops_count_the_checkpointed_share_of_layers():
    module = CausalLMFineTune(lora_r=4)
    module.configure_model()
    without, full = flops_coefficients(module, checkpoint_fraction=0.0), flops_coefficients(module, checkpoint_fraction=1.0)
    assert flops_coefficients(module, checkpoint_fraction=1.0) == full and flops_coefficients(module, checkpoint_fraction=0.0) == without
    half = flops_coefficients(module, checkpoint_fraction=0.5)
    for low, middle, high in zip(without, half, full):
        assert low < middle < high and middle == pytest.approx((low + high) / 2, rel=1e-12)
    with pytest.raises(ValueError, match=r"checkpoint_fraction must be a number in \[0, 1\]"):
        flops_coefficients(module, checkpoint_fraction=1.5)


def test_checkpoint_fraction_read_from_the_model():
    from lightning_fastft.training.checkpointing import apply_activation_checkpointing, remove_activation_checkpointing

    model = build_causal_lm({**TINY_LLAMA_CONFIG, "num_hidden_layers": 4})
    assert checkpoint_fraction_of(model) == 0.0
    apply_activation_checkpointing(model, "recompute", checkpoint_fraction=0.5)
    assert checkpoint_fraction_of(model) == 0.5
    apply_activation_checkpointing(model, "offload", checkpoint_fraction=1.0)
    assert checkpoint_fraction_of(model) == 1.0
    remove_activation_checkpointing(model)
    model.gradient_checkpointing_enable()  # HF's own checkpointing recomputes every layer
    assert checkpoint_fraction_of(model) == 1.0


def test_flops_count_the_logical_weights_of_4bit_layers():
    import bitsandbytes as bnb  # a hard dependency: a broken install must fail, not skip
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
    assert metrics.checkpoint_fraction == 1.0  # read from the model the strategy checkpointed


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


# --- MFU's peak: the device's for the dtype the model computes in --------------------------------


def _gpu(monkeypatch, name):
    """A CUDA device torch names ``name``: only the name is read, no GPU needed."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return torch.device("cuda", 0)


@pytest.fixture
def set_tf32():
    """``set_tf32(on)`` switches float32 matmuls to TF32 or IEEE (the flag Lightning reads); restored after."""
    previous = torch.backends.cuda.matmul.allow_tf32

    def set_tf32(on):
        torch.backends.cuda.matmul.allow_tf32 = on

    yield set_tf32
    torch.backends.cuda.matmul.allow_tf32 = previous


def _fit_in(device, precision, callback):
    module = CausalLMFineTune()
    data = SyntheticCausalLMDataModule(batch_size=2, seq_len=10, num_samples=2 * STEPS, seed=5)
    trainer = quiet_trainer(device, precision=precision, max_steps=STEPS, callbacks=[callback])
    trainer.fit(module, data)
    return module, data, trainer


def _assert_mfu(module, data, trainer, peak):
    fixed, per_position = flops_coefficients(module)
    bar = trainer.progress_bar_metrics
    expected = bar["tokens_per_sec_total"] * (fixed + per_position * data.hparams.seq_len) / peak
    assert bar["mfu"] == pytest.approx(expected, rel=1e-4)


def test_peak_flops_by_gpu_and_compute_dtype(monkeypatch, set_tf32):
    h200 = _gpu(monkeypatch, "NVIDIA H200")
    assert peak_flops_for(h200, torch.bfloat16) == peak_flops_for(h200, torch.float16) == 989e12
    set_tf32(False)
    assert peak_flops_for(h200, torch.float32) == 67e12
    set_tf32(True)
    assert peak_flops_for(h200, torch.float32) == peak_flops_for(h200, "tf32") == 494.5e12
    assert peak_flops_for(_gpu(monkeypatch, "NVIDIA H200 NVL"), torch.bfloat16) == 835e12
    assert peak_flops_for(_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB"), torch.float32) == 156e12
    v100 = _gpu(monkeypatch, "Tesla V100-SXM2-16GB")
    assert peak_flops_for(v100, torch.float16) == 125e12
    assert peak_flops_for(v100, torch.float32) == 15.7e12  # no TF32 tensor cores before Ampere
    assert peak_flops_for(v100, torch.bfloat16) is None  # nor bf16 ones
    assert peak_flops_for(_gpu(monkeypatch, "NVIDIA Mystery GPU"), torch.bfloat16) is None
    assert peak_flops_for(torch.device("cpu"), torch.float32) is None


@pytest.mark.parametrize(
    "precision, expected",
    [
        ("bf16-true", torch.bfloat16),
        ("bf16-mixed", torch.bfloat16),
        ("16-mixed", torch.float16),
        ("16-true", torch.float16),
        ("32-true", torch.float32),
    ],
)
def test_compute_dtype_of_the_precision_plugin(precision, expected):
    from types import SimpleNamespace

    from lightning.pytorch.plugins import HalfPrecision, MixedPrecision, Precision

    from lightning_fastft.callbacks.metrics import compute_dtype

    if precision.endswith("-mixed"):
        plugin = MixedPrecision(precision, "cpu")  # Trainer(precision="16-mixed") turns bf16 on CPU
    else:
        plugin = Precision() if precision == "32-true" else HalfPrecision(precision)
    module = CausalLMFineTune()
    module.configure_model()  # fp32 weights: the plugin decides, as it converts them in fit
    assert compute_dtype(SimpleNamespace(precision_plugin=plugin), module) is expected


def test_compute_dtype_of_32_true_is_the_weights_own():
    """32-true leaves the weights as loaded: bf16 weights compute in bf16, 4-bit base weights in their
    compute dtype (the rest fp32 here), 8-bit ones in the activations' dtype (the other weights')."""
    import bitsandbytes as bnb  # a hard dependency: a broken install must fail, not skip
    from types import SimpleNamespace

    from lightning.pytorch.plugins import Precision

    from lightning_fastft.callbacks.metrics import compute_dtype
    from lightning_fastft.bnb import quantize_linear_layers

    trainer = SimpleNamespace(precision_plugin=Precision())
    assert compute_dtype(trainer, build_causal_lm(TINY_LLAMA_CONFIG)) is torch.float32
    assert compute_dtype(trainer, build_causal_lm(TINY_LLAMA_CONFIG).to(torch.bfloat16)) is torch.bfloat16

    four_bit = build_causal_lm(TINY_LLAMA_CONFIG)
    assert quantize_linear_layers(four_bit, compute_dtype=torch.float16, skip_modules=())
    assert {p.dtype for p in four_bit.parameters()} == {torch.uint8, torch.float32}
    assert compute_dtype(trainer, four_bit) is torch.float16

    eight_bit = build_causal_lm(TINY_LLAMA_CONFIG).to(torch.float16)
    for name, linear in [(n, m) for n, m in eight_bit.named_modules() if type(m) is torch.nn.Linear]:
        quantized = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False)
        quantized.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
        parent, _, child = name.rpartition(".")
        setattr(eight_bit.get_submodule(parent), child, quantized.to("cpu"))  # quantises to int8
    assert {p.dtype for p in eight_bit.parameters()} == {torch.int8, torch.float16}
    assert compute_dtype(trainer, eight_bit) is torch.float16


@pytest.mark.parametrize("precision, dtype", [("bf16-true", torch.bfloat16), ("32-true", torch.float32)])
def test_mfu_divides_by_the_peak_of_the_training_dtype(device, monkeypatch, precision, dtype):
    import lightning_fastft.callbacks.metrics as metrics_module

    peaks = {torch.bfloat16: 2e12, torch.float32: 5e11}
    asked = []

    def peak_for(device, dtype=torch.bfloat16):
        asked.append((device.type, dtype))
        return peaks[dtype]

    monkeypatch.setattr(metrics_module, "peak_flops_for", peak_for)
    callback = FastFTMetrics(window=2)
    module, data, trainer = _fit_in(device, precision, callback)
    assert asked == [(device, dtype)]
    assert callback.available_flops == peaks[dtype] and callback.compute_dtype is dtype
    _assert_mfu(module, data, trainer, peaks[dtype])


def test_peak_flops_argument_overrides_the_look_up(device, monkeypatch):
    import lightning_fastft.callbacks.metrics as metrics_module

    def no_look_up(*args, **kwargs):
        raise AssertionError("peak looked up despite peak_flops=")

    monkeypatch.setattr(metrics_module, "compute_dtype", no_look_up)
    monkeypatch.setattr(metrics_module, "peak_flops_for", no_look_up)
    callback = FastFTMetrics(peak_flops=PEAK, window=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module, data, trainer = _fit_in(device, "bf16-true", callback)
    assert not [w for w in caught if "FastFTMetrics" in str(w.message)]
    assert callback.available_flops == PEAK
    _assert_mfu(module, data, trainer, PEAK)


def test_unknown_peak_logs_tokens_per_sec_without_mfu(device, monkeypatch):
    _gpu(monkeypatch, "NVIDIA Mystery GPU")  # on a GPU machine: a GPU the table lacks
    callback = FastFTMetrics(window=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, trainer = _fit_in(device, "bf16-true", callback)
    messages = [str(w.message) for w in caught if "FastFTMetrics" in str(w.message)]
    if device == "cuda":  # an unlisted GPU: one warning naming it
        assert len(messages) == 1, messages
        assert "no peak FLOP/s known for GPU 'NVIDIA Mystery GPU' computing in bfloat16" in messages[0]
        assert "without MFU" in messages[0] and "peak_flops=" in messages[0]
    else:  # a CPU has no MFU to miss: no first-run noise
        assert messages == []
    assert callback.available_flops is None
    assert trainer.progress_bar_metrics["tokens_per_sec"] > 0 and "mfu" not in trainer.progress_bar_metrics
