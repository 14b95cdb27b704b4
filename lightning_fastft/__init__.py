"""lightning_fastft: fast, memory-lean LLM fine-tuning for PyTorch Lightning.

Importing the package registers the ``"fastft"``, ``"fastft_ddp"``, ``"fastft_ddp_spawn"`` and
``"fastft_fsdp"`` strategy names, so ``Trainer(strategy="fastft")`` works.
"""

__version__ = "0.1.0"

from lightning_fastft.strategies import (  # noqa: E402
    FastFTDDPStrategy,
    FastFTFSDPStrategy,
    FastFTStrategy,
    register_strategies,
)
from lightning_fastft.callbacks import FastFT, FastFTMetrics  # noqa: E402

register_strategies()

__all__ = [
    "FastFT",
    "FastFTDDPStrategy",
    "FastFTFSDPStrategy",
    "FastFTMetrics",
    "FastFTStrategy",
    "register_strategies",
]
