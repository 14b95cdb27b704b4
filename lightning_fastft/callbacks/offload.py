"""Lightning callback that checkpoints the decoder layers' activations (on the device or in host memory)."""

from __future__ import annotations

import warnings
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_fastft.patching.options import Checkpointing, check_checkpointing
from lightning_fastft.training.checkpointing import apply_activation_checkpointing


class ActivationCheckpointing(Callback):
    """Apply :func:`~lightning_fastft.training.checkpointing.apply_activation_checkpointing` before training.

    It runs in ``on_fit_start``: after ``configure_model`` built the model and the strategy moved
    (and possibly DDP-wrapped) it, before the first training step. ``checkpointing``,
    ``checkpoint_fraction`` and ``memory_budget_gib`` are those of
    :class:`~lightning_fastft.patching.options.PatchOptions`.
    """

    def __init__(
        self,
        checkpointing: Checkpointing,
        checkpoint_fraction: float = 1.0,
        memory_budget_gib: Optional[float] = None,
    ):
        check_checkpointing(
            checkpointing, checkpoint_fraction=checkpoint_fraction, memory_budget_gib=memory_budget_gib, optional=False
        )
        self.checkpointing = checkpointing
        self.checkpoint_fraction = checkpoint_fraction
        self.memory_budget_gib = memory_budget_gib
        self.wrapped_layers = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = apply_activation_checkpointing(
            pl_module,
            self.checkpointing,
            checkpoint_fraction=self.checkpoint_fraction,
            memory_budget_gib=self.memory_budget_gib,
        )
        self.wrapped_layers = len(layers)


class ActivationOffload(ActivationCheckpointing):
    """Deprecated name of :class:`ActivationCheckpointing` (``mode``/``fraction`` are now
    ``checkpointing``/``checkpoint_fraction``); kept for one release."""

    def __init__(self, mode: Checkpointing = "offload", fraction: float = 1.0):
        warnings.warn(
            "lightning_fastft: ActivationOffload(mode=, fraction=) is deprecated; use "
            "ActivationCheckpointing(checkpointing=, checkpoint_fraction=)",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(mode, fraction)
