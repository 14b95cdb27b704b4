"""CausalLMFineTune outside fitting: prediction (greedy generation of new token ids)."""

import torch
from helpers import NO_PATCHES, quiet_trainer
from torch.utils.data import DataLoader

from lightning_fastft.module import CausalLMFineTune
from lightning_fastft.strategies import FastFTStrategy

NEW_TOKENS = 32  # CausalLMFineTune's default max_new_tokens


def _pad(rows, left=False):
    """Rows stacked into one tensor, zero-padded on the right (or the left)."""
    if left:
        return torch.nn.utils.rnn.pad_sequence([row.flip(0) for row in rows], batch_first=True).flip(1)
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


def test_predict_generates_new_tokens_after_each_row_whatever_its_padding(device):
    module = CausalLMFineTune(lora_r=2)
    rows = [torch.tensor([5, 9, 17, 3, 8]), torch.tensor([7, 2]), torch.tensor([11, 4, 6])]
    masks = [torch.ones_like(row) for row in rows]
    right_padded = {"input_ids": _pad(rows), "attention_mask": _pad(masks)}
    left_padded = {"input_ids": _pad(rows, left=True), "attention_mask": _pad(masks, left=True)}
    trainer = quiet_trainer(device, strategy=FastFTStrategy(**NO_PATCHES))
    predictions = trainer.predict(module, DataLoader([right_padded, left_padded], batch_size=None))

    model = module.model
    for row, right, left in zip(rows, *predictions, strict=True):
        with torch.no_grad():
            alone = model.generate(input_ids=row[None].to(model.device), max_new_tokens=NEW_TOKENS, do_sample=False)
        expected = alone[0, len(row) :].cpu()
        assert right.shape == (NEW_TOKENS,) and torch.equal(right.cpu(), expected)
        assert torch.equal(left.cpu(), expected)
