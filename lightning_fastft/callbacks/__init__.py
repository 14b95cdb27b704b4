"""Lightning callbacks: the fastft patches with any strategy, activation offload, and metrics."""

from typing import Any

from lightning_fastft.callbacks.metrics import FastFTMetrics
from lightning_fastft.callbacks.patch import FastFT

__all__ = ["ActivationOffload", "FastFT", "FastFTMetrics"]


def __getattr__(name: str) -> Any:
    # ActivationOffload imports transformers; loaded on first use to keep `import lightning_fastft` cheap
    if name == "ActivationOffload":
        from lightning_fastft.callbacks.offload import ActivationOffload

        return ActivationOffload
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
