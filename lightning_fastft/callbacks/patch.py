"""``FastFT`` callback: the lightning_fastft patches with any strategy."""

from __future__ import annotations

import weakref
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_fastft.strategies.fastft import CheckpointingMode, PatchOptions


class FastFT(Callback):
    """Apply the lightning_fastft patches to the LightningModule, whatever the strategy.

    The patches run at the start of fit/validate/test/predict, i.e. after ``configure_model``
    has built the model; they replace forwards and never parameters, so the optimizers that
    the strategy has already built stay valid. Each module is patched once.

    Args: the patch switches, ``checkpointing`` mode and ``checkpoint_fraction`` (share in (0, 1]
    of each decoder stack's layers checkpointed, evenly spread) of
    :class:`~lightning_fastft.strategies.PatchOptions`.
    """

    def __init__(
        self,
        rms_norm: bool = True,
        rope: bool = True,
        mlp: bool = True,
        cross_entropy: bool = True,
        lora: bool = True,
        checkpointing: Optional[CheckpointingMode] = None,
        checkpoint_fraction: float = 1.0,
    ) -> None:
        self.patch_options = PatchOptions(rms_norm, rope, mlp, cross_entropy, lora, checkpointing, checkpoint_fraction)
        self.patch_report: Any = None
        self._patched: weakref.WeakSet[pl.LightningModule] = weakref.WeakSet()

    def _patch(self, pl_module: pl.LightningModule) -> None:
        if pl_module not in self._patched:
            self.patch_report = self.patch_options.apply(pl_module)
            self._patched.add(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._patch(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._patch(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._patch(pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._patch(pl_module)
