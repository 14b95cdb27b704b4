"""Lightning callback that checkpoints (and by default host-offloads) the decoder layers' activations."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_fastft.patching.offload import MODES, apply_activation_checkpointing, check_fraction


class ActivationOffload(Callback):
    """Apply :func:`~lightning_fastft.patching.offload.apply_activation_checkpointing` before training.

    It runs in ``on_fit_start``: after ``configure_model`` built the model and the strategy moved
    (and possibly DDP-wrapped) it, before the first training step. ``mode`` is ``"offload"`` (layer
    inputs kept in pinned host memory; plain recompute without CUDA) or ``"recompute"``;
    ``fraction`` (in (0, 1]) is the share of each decoder stack's layers checkpointed, evenly spread.
    """

    def __init__(self, mode: str = "offload", fraction: float = 1.0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_fraction(fraction)
        self.mode = mode
        self.fraction = fraction
        self.wrapped_layers = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.wrapped_layers = len(apply_activation_checkpointing(pl_module, self.mode, fraction=self.fraction))
