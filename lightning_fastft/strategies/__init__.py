"""Lightning strategies running fine-tuning with the lightning_fastft patches."""

from lightning_fastft.strategies.fastft import (
    FastFTDDPStrategy,
    FastFTFSDPStrategy,
    FastFTStrategy,
    FastFTStrategyMixin,
    register_strategies,
)

__all__ = [
    "FastFTDDPStrategy",
    "FastFTFSDPStrategy",
    "FastFTStrategy",
    "FastFTStrategyMixin",
    "register_strategies",
]
