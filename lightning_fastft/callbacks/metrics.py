"""``FastFTMetrics`` callback: tokens/s, MFU and peak GPU memory, to every logger and the progress bar.

Model FLOPs per token (matmuls only, multiply-add = 2 FLOPs), for a sequence of length ``T``:

    flops/token = 4 N + 2 N_trainable + 12 L d T  [+ r (2 N + 4 L d T)  when activations are recomputed]

* ``N``: parameters used in matmuls (all but the input embedding; a tied LM head counts),
  counting the logical weights of quantised layers (a bitsandbytes 4-bit tensor stores two per byte);
  forward costs ``2N`` and the backward's input gradients another ``2N``.
* ``N_trainable``: trainable matmul parameters, whose weight gradients cost ``2 N_trainable``
  (full fine-tuning: ``N_trainable = N``, giving the usual ``6N``; LoRA: the adapters only).
* ``12 L d T``: attention scores and values (``L`` layers, ``d`` = heads x head_dim),
  forward ``4 L d T`` plus backward ``8 L d T`` (PaLM's convention, causal masking not
  discounted). Packed sequences are counted at the full row length ``T``.
* recomputation (activation checkpointing) repeats the forward: ``+2N + 4 L d T``, times the share
  ``r`` of recomputed layers (``checkpoint_fraction``; 1 when every layer is checkpointed).

MFU = flops/token x tokens/s (all tokens, padding included: the matmuls run on it) / peak device
FLOP/s. The peak is looked up from the GPU name (dense bf16 tensor-core numbers) or given as
``peak_flops``.
All values are per device.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

# dense bf16 tensor-core peak FLOP/s by GPU name fragment; first match wins (more specific first)
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("V100", 125e12),
    ("T4", 65e12),
)


def peak_flops_for(device_name: str) -> Optional[float]:
    """Dense bf16 peak FLOP/s of the GPU called ``device_name``, ``None`` when unknown."""
    for fragment, flops in PEAK_BF16_FLOPS:
        if fragment in device_name:
            return flops
    return None


def _outermost_hf_model(module: nn.Module) -> Optional[nn.Module]:
    from transformers import PreTrainedModel

    return next((m for m in module.modules() if isinstance(m, PreTrainedModel)), None)


def _logical_numel(param: torch.Tensor) -> int:
    """Number of weights ``param`` holds: its ``numel()``, or for a quantised bitsandbytes 4-bit
    parameter (packed two per byte) the shape of the weight it stands for."""
    quant_state = getattr(param, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else param.numel()


def count_real_tokens(batch: Any) -> int:
    """Non-padding tokens of ``batch``: its int ``num_real_tokens`` (packed batches from
    ``PackedCollator``), else ``attention_mask.sum()``, else every token of ``input_ids``."""
    num_real_tokens = batch.get("num_real_tokens")
    if num_real_tokens is not None:
        return int(num_real_tokens)
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def flops_coefficients(module: nn.Module, recompute: Union[bool, float] = False) -> Optional[tuple[float, float]]:
    """``(a, b)`` with training FLOPs per token ``= a + b * seq_len`` for the HF causal LM inside ``module``.

    ``recompute``: the share in [0, 1] of the forward recomputed by activation checkpointing
    (``True`` = 1, ``False`` = 0). Formula in the module docstring; ``None`` when ``module`` holds
    no HF model.
    """
    share = float(recompute)
    if not 0 <= share <= 1:
        raise ValueError(f"recompute must be a bool or a share in [0, 1], got {recompute!r}")
    model = _outermost_hf_model(module)
    if model is None:
        return None
    config = model.config.get_text_config()
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied_head = output is not None and output.weight is embedding
    matmul_params = matmul_trainable = 0
    for param in model.parameters():
        if param is embedding and not tied_head:
            continue
        numel = _logical_numel(param)
        matmul_params += numel
        if param.requires_grad:
            matmul_trainable += numel
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention_per_position = config.num_hidden_layers * config.num_attention_heads * head_dim
    fixed = 4 * matmul_params + 2 * matmul_trainable
    per_position = 12 * attention_per_position
    fixed += share * 2 * matmul_params
    per_position += share * 4 * attention_per_position
    return float(fixed), float(per_position)


def recomputed_share(module: nn.Module) -> float:
    """Share of the decoder layers inside ``module`` whose forward is recomputed in backward: those
    wrapped by :func:`~lightning_fastft.training.checkpointing.apply_activation_checkpointing` (however it
    was applied), or all of them under HF's own gradient checkpointing."""
    from lightning_fastft.training.checkpointing import (
        checkpointed_layers,
        find_decoder_layer_lists,
        hf_gradient_checkpointing_on,
    )

    if hf_gradient_checkpointing_on(module):
        return 1.0
    total = sum(len(stack) for stack in find_decoder_layer_lists(module))
    return len(checkpointed_layers(module)) / total if total else 0.0


class FastFTMetrics(Callback):
    """Log ``tokens_per_sec`` (non-padding tokens), ``tokens_per_sec_total``, ``mfu`` and ``peak_mem_gib``.

    Timing covers ``on_train_batch_start`` to ``on_train_batch_end`` (CUDA synchronized), averaged
    over the last ``window`` batches. Non-padding tokens are counted by :func:`count_real_tokens`.
    Metrics go to the progress bar, and to the loggers when the trainer has any.

    Args:
        peak_flops: peak FLOP/s of one device for MFU; default: looked up from the GPU name (no
            MFU when unknown, e.g. on CPU).
        recompute: whether activations are recomputed, or the recomputed share of the layers in
            [0, 1] (counts that much extra forward in MFU); default: :func:`recomputed_share` of
            the model when training starts (after every strategy/callback set-up).
        window: number of recent batches the rates are averaged over.
    """

    def __init__(
        self, peak_flops: Optional[float] = None, recompute: Optional[Union[bool, float]] = None, window: int = 10
    ) -> None:
        self.peak_flops = peak_flops
        self.recompute = recompute
        self._batches: deque[tuple[float, int, int, int]] = deque(maxlen=window)
        self._batch_start = 0.0
        self._flops_coefficients: Optional[tuple[float, float]] = None

    @staticmethod
    def _synchronize(pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recompute is None:
            self.recompute = recomputed_share(pl_module)
        if self.peak_flops is None and pl_module.device.type == "cuda":
            self.peak_flops = peak_flops_for(torch.cuda.get_device_name(pl_module.device))
        self._flops_coefficients = flops_coefficients(pl_module, self.recompute)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._synchronize(pl_module)
        self._batch_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._synchronize(pl_module)
        elapsed = time.perf_counter() - self._batch_start
        input_ids = batch["input_ids"]
        self._batches.append((elapsed, count_real_tokens(batch), input_ids.numel(), input_ids.shape[-1]))

        seconds = sum(b[0] for b in self._batches)
        metrics = {
            "tokens_per_sec": sum(b[1] for b in self._batches) / seconds,
            "tokens_per_sec_total": sum(b[2] for b in self._batches) / seconds,
        }
        if self.peak_flops and self._flops_coefficients is not None:
            fixed, per_position = self._flops_coefficients
            flops = sum(b[2] * (fixed + per_position * b[3]) for b in self._batches)
            metrics["mfu"] = flops / seconds / self.peak_flops
        if pl_module.device.type == "cuda":
            metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        pl_module.log_dict(
            metrics, on_step=True, on_epoch=False, prog_bar=True, logger=bool(trainer.loggers), batch_size=1
        )
