"""``FastFT`` callback: the lightning_fastft patches with any strategy."""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_fastft.patching.options import PatchOptions, takes_patch_options


class FastFT(Callback):
    """Apply the lightning_fastft patches to the LightningModule, whatever the strategy.

    The patches run at the start of fit/validate/test/predict, i.e. after ``configure_model``
    has built the model; they replace forwards and never parameters, so the optimizers that
    the strategy has already built stay valid. Each module is patched once.

    Args: the :class:`~lightning_fastft.patching.options.PatchOptions`, as keywords.
    """

    @takes_patch_options
    def __init__(self, **options: Any) -> None:
        self.patch_options = PatchOptions(**options)
        self.patch_report: Any = None
        self._patched: weakref.WeakSet[pl.LightningModule] = weakref.WeakSet()

    def _patch(self, pl_module: pl.LightningModule) -> None:
        if pl_module not in self._patched:
            from lightning_fastft import patching

            self.patch_report = patching.patch_model(pl_module, **dataclasses.asdict(self.patch_options))
            self._patched.add(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._patch(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._patch(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._patch(pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._patch(pl_module)
