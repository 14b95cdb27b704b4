"""Synthetic data and the tiny model config for smoke tests, benchmarks, the CLI examples and the README."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_fastft.constants import IGNORE_INDEX

TINY_LLAMA_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


class _RandomTokenRows(Dataset):
    def __init__(self, vocab_size: int, seq_len: int, num_samples: int, min_len: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1, vocab_size, (num_samples, seq_len), generator=generator)
        lengths = torch.randint(min_len, seq_len + 1, (num_samples, 1), generator=generator)
        self.attention_mask = (torch.arange(seq_len) < lengths).long()
        self.input_ids = self.input_ids * self.attention_mask  # pad id 0 after each row's length

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids, mask = self.input_ids[index], self.attention_mask[index]
        labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class SyntheticCausalLMDataModule(pl.LightningDataModule):
    """Random token rows of random length (right-padded with id 0, padding labelled -100).

    For smoke tests, benchmarks and the CLI examples; deterministic given ``seed``.
    """

    def __init__(
        self,
        vocab_size: int = 128,
        seq_len: int = 32,
        batch_size: int = 4,
        num_samples: int = 64,
        min_len: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        min_len = seq_len // 2 if min_len is None else min_len
        self.train_set = _RandomTokenRows(vocab_size, seq_len, num_samples, min_len, seed)
        self.val_set = _RandomTokenRows(vocab_size, seq_len, max(batch_size, num_samples // 8), min_len, seed + 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The validation rows (their ``labels`` are ignored by ``predict_step``)."""
        return self.val_dataloader()
