"""Data utilities: uncontaminated sequence packing and padding collators."""

from lightning_fastft.data.packing import (
    IGNORE_INDEX,
    PackedCollator,
    PaddedCollator,
    pack_dataset,
    pack_sequences,
    sample_labels,
    token_utilisation,
)

__all__ = [
    "IGNORE_INDEX",
    "PackedCollator",
    "PaddedCollator",
    "pack_dataset",
    "pack_sequences",
    "sample_labels",
    "token_utilisation",
]
