"""Data utilities: uncontaminated sequence packing, padding collators, synthetic data."""

from lightning_fastft.constants import IGNORE_INDEX
from lightning_fastft.data.packing import (
    PackedCollator,
    PaddedCollator,
    pack_dataset,
    pack_sequences,
    sample_labels,
    token_utilisation,
)
from lightning_fastft.data.synthetic import TINY_LLAMA_CONFIG, SyntheticCausalLMDataModule

__all__ = [
    "IGNORE_INDEX",
    "PackedCollator",
    "PaddedCollator",
    "pack_dataset",
    "pack_sequences",
    "SyntheticCausalLMDataModule",
    "TINY_LLAMA_CONFIG",
    "sample_labels",
    "token_utilisation",
]
