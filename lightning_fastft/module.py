"""A generic, CLI-friendly causal-LM fine-tuning LightningModule and a synthetic data module."""

from __future__ import annotations

from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_fastft.constants import IGNORE_INDEX
from lightning_fastft.training.adapter_checkpoint import check_adapter_state_dict

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


def build_causal_lm(model: Any) -> torch.nn.Module:
    """A HF causal LM from a config dict (``model_type`` + fields), a ``PretrainedConfig`` (random
    init, no hub access), or a local directory (``from_pretrained``, local files only)."""
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if isinstance(model, str):
        return AutoModelForCausalLM.from_pretrained(model, local_files_only=True)
    if isinstance(model, dict):
        fields = dict(model)
        model = AutoConfig.for_model(fields.pop("model_type"), **fields)
    if not isinstance(model, PretrainedConfig):
        raise TypeError(f"model must be a config dict, a PretrainedConfig or a local path, got {type(model)}")
    return AutoModelForCausalLM.from_config(model)


class CausalLMFineTune(pl.LightningModule):
    """Fine-tune a HF causal LM, fully or with LoRA.

    The model is built in ``configure_model`` (so sharded/on-device init contexts apply); it is
    ``None`` before the Trainer runs. Its random weights (the whole model from a config, the
    initial LoRA adapters) are drawn from ``init_seed``, which the checkpoints store, so
    ``CausalLMFineTune.load_from_checkpoint(path)`` rebuilds the same frozen base and loads
    adapter-only checkpoints (see :mod:`lightning_fastft.training.adapter_checkpoint`).

    Args:
        model: a HF config dict (``{"model_type": "llama", ...}``), a ``PretrainedConfig`` or a
            local model directory.
        lora_r: LoRA rank; 0 means full fine-tuning.
        lora_alpha, lora_dropout, target_modules: LoRA settings (peft's ``"all-linear"`` by default).
        learning_rate, weight_decay, betas: AdamW settings (no decay on 1-D parameters).
        warmup_steps: linear learning-rate warm-up over this many optimizer steps, then constant.
        init_seed: seed of the random weights ``configure_model`` draws; ``None`` draws one from
            torch's random generator at construction (recorded in ``hparams``).
        max_new_tokens: how many tokens ``predict_step`` generates per row.

    Batches are dicts of ``input_ids``, ``labels`` and ``attention_mask`` or ``position_ids``
    (plus anything else the model's forward takes, e.g. ``shift_labels``).

    ``trainer.predict`` (and ``lightning-fastft predict``) returns, per batch, the greedy
    continuation of each row: a ``(batch, <= max_new_tokens)`` tensor of the generated token ids
    only (rows that end early are padded with the pad/eos id); see :meth:`predict_step`.
    """

    def __init__(
        self,
        model: Union[str, dict[str, Any]] = TINY_LLAMA_CONFIG,
        lora_r: int = 0,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        target_modules: Union[str, list[str]] = "all-linear",
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        init_seed: Optional[int] = None,
        max_new_tokens: int = 32,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if init_seed is None:  # recorded in the checkpoints, so a reload draws the same weights
            self.hparams.init_seed = int(torch.randint(2**31 - 1, ()))
        self.model: Optional[torch.nn.Module] = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.hparams.init_seed)
            self.model = self._build_model()

    def _build_model(self) -> torch.nn.Module:
        model = build_causal_lm(self.hparams.model)
        if self.hparams.lora_r > 0:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=self.hparams.lora_r,
                lora_alpha=self.hparams.lora_alpha,
                lora_dropout=self.hparams.lora_dropout,
                target_modules=self.hparams.target_modules,
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, lora)
        return model

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``strict`` accepts adapter-only checkpoints: frozen weights may be missing (``configure_model``
        has rebuilt them), every trainable weight must be there and no key may be unknown."""
        if strict:
            check_adapter_state_dict(self, state_dict)
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def forward(self, **batch: Any) -> Any:
        return self.model(**batch)

    def _logged_loss(self, batch: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        loss = self(**batch).loss
        self.log(name, loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._logged_loss(batch, "train_loss")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._logged_loss(batch, "val_loss")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Greedy generation of ``max_new_tokens`` after each row of ``input_ids`` (``labels`` are ignored).

        Rows may be padded on either side (``attention_mask``); they are left-aligned for generation.
        Packed rows (``position_ids`` without ``attention_mask``) hold several sequences and are refused.
        """
        input_ids, mask = batch["input_ids"], batch.get("attention_mask")
        if mask is None:
            if "position_ids" in batch:
                raise ValueError("predict_step generates from padded rows; got a packed batch (position_ids).")
            mask = torch.ones_like(input_ids)
        order = mask.argsort(dim=1, stable=True)  # padding first, tokens in order: continue after the last one
        input_ids, mask = input_ids.gather(1, order), mask.gather(1, order)
        generated = self.model.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=self.hparams.max_new_tokens, do_sample=False
        )
        return generated[:, input_ids.shape[1] :]

    def configure_optimizers(self) -> Any:
        trainable = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": self.hparams.weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=self.hparams.learning_rate, betas=tuple(self.hparams.betas)
        )
        if self.hparams.warmup_steps <= 0:
            return optimizer
        warmup = self.hparams.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


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
