"""Lightning callbacks: the fastft patches with any strategy, activation checkpointing, and metrics."""

from typing import Any

from lightning_fastft.callbacks.metrics import FastFTMetrics
from lightning_fastft.callbacks.patch import FastFT

__all__ = ["ActivationCheckpointing", "ActivationOffload", "FastFT", "FastFTMetrics"]


def __getattr__(name: str) -> Any:
    # these import transformers; loaded on first use to keep `import lightning_fastft` cheap
    if name in ("ActivationCheckpointing", "ActivationOffload"):
        from lightning_fastft.callbacks import offload

        return getattr(offload, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
