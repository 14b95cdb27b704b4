"""Helpers shared by the test modules (``from helpers import ...``; pytest puts ``tests/`` on sys.path).

Importing this module imports lightning, which imports triton: only test modules import it, after
``conftest.py`` has set TRITON_INTERPRET (scripts that import it must set that first themselves).
"""

import importlib.util
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

# FastFTStrategy keyword arguments that switch every kernel patch off.
NO_PATCHES = dict(rms_norm=False, rope=False, mlp=False, cross_entropy=False, fused_lora=False)

# Relative tolerance of a kernel against its fp32 reference, by input dtype.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def assert_max_relative_close(actual, expected, dtype):
    """Largest elementwise error within ``TOLERANCE[dtype]`` of the largest ``|expected|``."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    error = (actual.float() - expected.float()).abs().max()
    scale = expected.float().abs().max().clamp_min(1e-6)
    assert error <= TOLERANCE[dtype] * scale, f"relative error {(error / scale).item():.3g}"


def assert_norm_relative_close(actual, expected, dtype):
    """Relative error in norm, so bf16 rounding flips on single elements don't dominate."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    error = (actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)
    assert error < TOLERANCE[dtype], f"relative error {error:.2e}"


def assert_close_scaled(actual, expected, rtol):
    """``torch.testing.assert_close`` with ``atol = rtol * max|expected|``: small elements judged on the whole scale."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def hook_outputs(class_suffix, *models):
    """A no-op forward hook on every module of ``models`` whose class name ends with ``class_suffix``:
    something that sees the module's output (so a recompute must compute it)."""
    for model in models:
        for module in model.modules():
            if type(module).__name__.endswith(class_suffix):
                module.register_forward_hook(lambda module, args, output: None)


def eval_logits(model, input_ids):
    """fp32 logits of one forward pass without autograd."""
    with torch.no_grad():
        return model(input_ids).logits.float()


class RecordLosses(Callback):
    """Collects the training loss of every step."""

    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def quiet_trainer(device, **overrides) -> pl.Trainer:
    """One-device Trainer on ``device`` without logger, checkpoints, progress bar, model summary or validation."""
    settings = dict(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    settings.update(overrides)
    return pl.Trainer(**settings)


def load_script(path: Path):
    """Imports a script (an example or benchmark, not part of the package) as a module named after its file."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
