"""A generic, CLI-friendly causal-LM fine-tuning LightningModule that builds its own model."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch

from lightning_fastft.data.synthetic import TINY_LLAMA_CONFIG, SyntheticCausalLMDataModule  # noqa: F401 (old home)
from lightning_fastft.qlora import QuantSettings, QuantType
from lightning_fastft.training.adapter_checkpoint import check_adapter_state_dict


def build_causal_lm(model: Any) -> torch.nn.Module:
    """A HF causal LM from a config dict (``model_type`` + fields), a ``PretrainedConfig`` (random
    init, no hub access), or a local directory or hub name (``from_pretrained``; no download
    with ``HF_HUB_OFFLINE=1``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if isinstance(model, str):
        return AutoModelForCausalLM.from_pretrained(model)
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
        lora_alpha, lora_dropout, target_modules: the other
            :class:`~lightning_fastft.qlora.LoraSettings` (PEFT's ``"all-linear"`` by default).
        quant_type: ``None``, or ``"nf4"``/``"fp4"``: QLoRA, the frozen base quantised to
            bitsandbytes 4-bit (computing in bf16) before LoRA is attached; needs ``lora_r > 0``.
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
        quant_type: Optional[QuantType] = None,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        init_seed: Optional[int] = None,
        max_new_tokens: int = 32,
    ) -> None:
        super().__init__()
        if quant_type is not None:
            QuantSettings(quant_type=quant_type)  # validates the name
            if lora_r == 0:
                raise ValueError(f"quant_type={quant_type!r} needs LoRA (lora_r > 0): a 4-bit base cannot be trained")
        self.save_hyperparameters()
        if init_seed is None:  # recorded in the checkpoints, so a reload draws the same weights
            self.hparams.init_seed = int(torch.randint(2**31 - 1, ()))
        self.model: Optional[torch.nn.Module] = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
        # random weights from a config are drawn on the CPU (then moved by the strategy), so a reload
        # on any device rebuilds the same base: the CUDA generator draws other numbers for a seed
        random_base = not isinstance(self.hparams.model, str)
        with torch.random.fork_rng(devices=devices), torch.device("cpu") if random_base else nullcontext():
            torch.manual_seed(self.hparams.init_seed)
            # from_pretrained returns eval mode, and Lightning keeps submodules' modes: without this
            # a loaded model would train with dropout and the fused loss off
            self.model = self._build_model().train()

    def _build_model(self) -> torch.nn.Module:
        """The model: built (:func:`build_causal_lm`), then LoRA attached; with ``quant_type`` a model
        directory is quantised by transformers while loading, a config-built model in place."""
        from lightning_fastft.qlora import LoraSettings, attach_lora, load_qlora, prepare_qlora

        source, quant_type = self.hparams.model, self.hparams.quant_type
        lora = {field: self.hparams[field] for field in LoraSettings.__dataclass_fields__}
        if quant_type is not None and isinstance(source, str):
            return load_qlora(source, quant_type=quant_type, **lora)
        model = build_causal_lm(source)
        if self.hparams.lora_r == 0:
            return model
        if quant_type is None:
            return attach_lora(model, **lora)
        return prepare_qlora(model, quant_type=quant_type, **lora)

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
