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
  ``r`` of recomputed layers (``checkpoint_fraction``; 1 when every layer is checkpointed; under
  ``checkpointing="auto"`` the current plan's recomputed and offloaded layers).

MFU = flops/token x tokens/s (all tokens, padding included: the matmuls run on it) / peak device
FLOP/s. The peak is given as ``peak_flops``, or is the GPU's dense peak (:func:`peak_flops_for`) for
the dtype its matmuls run in (:func:`compute_dtype`: the precision plugin's, or the weights' own);
without one (CPU, an unlisted GPU) tokens/s are logged and MFU is not.
All values are per device.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_fastft.architectures import head_dim
from lightning_fastft.bnb import logical_numel
from lightning_fastft.patching.options import check_checkpoint_fraction

_Peaks = dict[Union[torch.dtype, str], float]


def _peaks(fp32: float, tf32: Optional[float], bf16: Optional[float], fp16: float) -> _Peaks:
    peaks: _Peaks = {torch.float32: fp32, torch.float16: fp16}
    if tf32 is not None:
        peaks["tf32"] = tf32
    if bf16 is not None:
        peaks[torch.bfloat16] = bf16
    return peaks


_H100_SXM = _peaks(67e12, 494.5e12, 989e12, 989e12)
_H100_PCIE = _peaks(51e12, 378e12, 756e12, 756e12)
_NVL = _peaks(60e12, 417.5e12, 835e12, 835e12)  # H100 NVL and H200 NVL, per GPU
_A100 = _peaks(19.5e12, 156e12, 312e12, 312e12)

# Dense peak FLOP/s of one GPU by the dtype its matmuls run in, by GPU name fragment; first match wins
# (more specific first). Dense = without 2:4 sparsity: half the tensor-core figures NVIDIA's datasheets
# quote "with sparsity". "tf32" is float32 on tensor cores (Ampere and later), used when TF32 matmuls
# are on (:func:`tf32_matmuls`). No bf16 entry where the GPU has no bf16 tensor cores (V100, T4).
# (Lightning's ``get_available_flops`` is not used: it knows no "NVIDIA H200" nor B200, reads
# "L40S" as the L4, and its H100 NVL / H200 rows are the sparse figures.)
PEAK_FLOPS: tuple[tuple[str, _Peaks], ...] = (
    ("GB200", _peaks(80e12, 1.25e15, 2.5e15, 2.5e15)),
    ("B200", _peaks(75e12, 1.125e15, 2.25e15, 2.25e15)),
    ("H100 PCIe", _H100_PCIE),
    ("H100 NVL", _NVL),
    ("H100", _H100_SXM),
    ("H200 NVL", _NVL),
    ("H200", _H100_SXM),  # the H100 SXM's compute, more memory
    ("H800 PCIe", _H100_PCIE),
    ("H800", _H100_SXM),
    ("A100", _A100),
    ("A800", _A100),
    ("L40S", _peaks(91.6e12, 183e12, 362e12, 362e12)),
    ("L40", _peaks(90.5e12, 90.5e12, 181e12, 181e12)),
    ("L4", _peaks(30.3e12, 60e12, 121e12, 121e12)),
    ("RTX 4090", _peaks(82.6e12, 82.6e12, 165e12, 165e12)),
    ("V100", _peaks(15.7e12, None, None, 125e12)),
    ("T4", _peaks(8.1e12, None, None, 65e12)),
)


def tf32_matmuls() -> bool:
    """Whether CUDA float32 matmuls run on TF32 tensor cores (``torch.set_float32_matmul_precision("high")``,
    ``torch.backends.cuda.matmul.allow_tf32`` or, torch >= 2.9, ``...matmul.fp32_precision = "tf32"``).

    Read through ``fp32_precision`` where it exists: after a mix of the legacy and the new API, torch
    raises on reading ``allow_tf32`` or ``torch.get_float32_matmul_precision()``.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    return precision == "tf32" if precision is not None else bool(matmul.allow_tf32)


def peak_flops_for(
    device: Union[torch.device, str], dtype: Union[torch.dtype, str] = torch.bfloat16
) -> Optional[float]:
    """Dense peak FLOP/s of one GPU for matmuls in ``dtype``; ``None`` when unknown.

    ``device``: a ``torch.device`` (a CUDA one is looked up by its name; others, e.g. the CPU, have no
    peak) or a GPU name as ``torch.cuda.get_device_name`` spells it. ``dtype``: the compute dtype
    (:func:`compute_dtype`) or ``"tf32"``; ``torch.float32`` counts as TF32 on GPUs with TF32 tensor
    cores while :func:`tf32_matmuls` is on, as in Lightning's ``get_available_flops``. ``None`` also
    for a dtype the GPU has no peak for (bf16 on a V100) and for GPUs not in :data:`PEAK_FLOPS`.
    """
    if isinstance(device, torch.device):
        if device.type != "cuda":
            return None
        device = torch.cuda.get_device_name(device)
    peaks = next((peaks for fragment, peaks in PEAK_FLOPS if fragment in device), None)
    if peaks is None:
        return None
    if dtype is torch.float32 and "tf32" in peaks and tf32_matmuls():
        dtype = "tf32"
    return peaks.get(dtype)


def compute_dtype(trainer: pl.Trainer, module: nn.Module) -> torch.dtype:
    """The dtype the matmuls of ``module`` run in under ``trainer``'s precision plugin.

    Mixed precision (``bf16-mixed``, ``16-mixed``): the autocast dtype. Otherwise the dtype
    Lightning's ``ThroughputMonitor`` reads from the plugin (``bf16-true``: bf16, ``16-true``: fp16,
    bitsandbytes: its compute dtype, ...), except where that is float32 (``32-true``): that plugin
    leaves the weights as loaded, and they decide. A model loaded in bf16 computes in bf16, and
    quantised bitsandbytes base weights count in the dtype they compute in: a 4-bit layer's
    ``compute_dtype``, for 8-bit ones the activations' (the other weights' dtype). ``float32``
    means fp32 or TF32, which :func:`peak_flops_for` tells apart.
    """
    plugin = trainer.precision_plugin
    precision = str(getattr(plugin, "precision", ""))
    if precision.endswith("-mixed"):
        return torch.bfloat16 if precision.startswith("bf16") else torch.float16
    from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

    plugin_dtype = _plugin_to_compute_dtype(plugin)
    if plugin_dtype is not torch.float32:
        return plugin_dtype
    return weights_compute_dtype(module) or plugin_dtype


def weights_compute_dtype(module: nn.Module) -> Optional[torch.dtype]:
    """The compute dtype of most matmul weights of ``module`` (by logical size; not the input
    embedding, a look-up, unless tied to the LM head); ``None`` without floating weights."""
    from lightning_fastft._hf import outermost_hf_model  # imports transformers: not at `import lightning_fastft`

    model = outermost_hf_model(module)
    lookup_only = None
    if model is None:
        model = module
    else:
        embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
        if output is None or output.weight is not embedding.weight:
            lookup_only = embedding.weight
    sizes: dict[torch.dtype, int] = {}
    seen: set[int] = set()
    for layer in model.modules():
        for param in layer.parameters(recurse=False):
            if id(param) in seen or param is lookup_only:
                continue
            seen.add(id(param))
            # quantised weights (uint8/int8 storage) compute in their layer's compute_dtype (4-bit)
            # or, without one (8-bit), in the activations' dtype: left to the other weights
            dtype = param.dtype if param.is_floating_point() else getattr(layer, "compute_dtype", None)
            if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
                sizes[dtype] = sizes.get(dtype, 0) + logical_numel(param)
    return max(sizes, key=sizes.__getitem__) if sizes else None


def count_real_tokens(batch: Any) -> int:
    """Non-padding tokens of ``batch``: its int ``num_real_tokens`` (packed batches from
    ``PackedCollator``), else ``attention_mask.sum()``, else every token of ``input_ids``."""
    num_real_tokens = batch.get("num_real_tokens")
    if num_real_tokens is not None:
        return int(num_real_tokens)
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def batch_tokens(batch: Any) -> tuple[int, int, int]:
    """``(non-padding tokens, all tokens, row length)`` of one (micro-)batch with ``input_ids``."""
    input_ids = batch["input_ids"]
    return count_real_tokens(batch), input_ids.numel(), input_ids.shape[-1]


class ThroughputWindow:
    """The rates over the last ``window`` timed steps, shared by :class:`FastFTMetrics` (a step = a
    Lightning batch) and the Hugging Face ``FastFTCallback`` (a step = an optimizer step of several
    micro-batches).

    A step is its seconds and the :func:`batch_tokens` of each (micro-)batch it ran. Set
    ``flops_coefficients`` (:func:`flops_coefficients`) and ``available_flops`` (peak FLOP/s) for MFU.
    """

    def __init__(self, window: int = 10) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        self.steps: deque[tuple[float, list[tuple[int, int, int]]]] = deque(maxlen=window)
        self.flops_coefficients: Optional[tuple[float, float]] = None
        self.available_flops: Optional[float] = None

    def add(self, seconds: float, batches: list[tuple[int, int, int]]) -> None:
        """Record a step of ``seconds`` that ran ``batches`` (each :func:`batch_tokens`)."""
        self.steps.append((seconds, batches))

    def metrics(self, device: Optional[torch.device] = None) -> dict[str, float]:
        """``tokens_per_sec``, ``tokens_per_sec_total``, ``mfu`` (with a peak and coefficients) and
        ``peak_mem_gib`` (a CUDA ``device``) over the window; empty before the first timed step."""
        seconds = sum(step[0] for step in self.steps)
        if not self.steps or seconds <= 0:
            return {}
        batches = [batch for step in self.steps for batch in step[1]]
        metrics = {
            "tokens_per_sec": sum(b[0] for b in batches) / seconds,
            "tokens_per_sec_total": sum(b[1] for b in batches) / seconds,
        }
        if self.available_flops and self.flops_coefficients is not None:
            fixed, per_position = self.flops_coefficients
            flops = sum(b[1] * (fixed + per_position * b[2]) for b in batches)
            metrics["mfu"] = flops / seconds / self.available_flops
        if device is not None and device.type == "cuda":
            metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        return metrics


def flops_coefficients(module: nn.Module, checkpoint_fraction: float = 0.0) -> Optional[tuple[float, float]]:
    """``(a, b)`` with training FLOPs per token ``= a + b * seq_len`` for the HF causal LM inside ``module``.

    ``checkpoint_fraction``: the share in [0, 1] of the decoder layers checkpointed, whose forward
    is recomputed in backward (0: no checkpointing). Formula in the module docstring; ``None`` when
    ``module`` holds no HF model.
    """
    check_checkpoint_fraction(checkpoint_fraction, allow_zero=True)
    share = checkpoint_fraction
    from lightning_fastft._hf import outermost_hf_model  # imports transformers: not at `import lightning_fastft`

    model = outermost_hf_model(module)
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
        numel = logical_numel(param)
        matmul_params += numel
        if param.requires_grad:
            matmul_trainable += numel
    attention_per_position = config.num_hidden_layers * config.num_attention_heads * head_dim(config)
    fixed = 4 * matmul_params + 2 * matmul_trainable
    per_position = 12 * attention_per_position
    fixed += share * 2 * matmul_params
    per_position += share * 4 * attention_per_position
    return float(fixed), float(per_position)


def checkpoint_fraction_of(module: nn.Module) -> float:
    """Share of the decoder layers inside ``module`` that are checkpointed (forward recomputed in backward): those
    wrapped by :func:`~lightning_fastft.training.checkpointing.apply_activation_checkpointing` (however it
    was applied; under ``checkpointing="auto"`` those its current plan checkpoints, none before the first
    training forward), or all of them under HF's own gradient checkpointing."""
    from lightning_fastft.training.checkpointing import (
        checkpointed_layers,
        find_decoder_layer_lists,
        hf_gradient_checkpointing_on,
    )

    if hf_gradient_checkpointing_on(module):
        return 1.0
    total = sum(len(stack) for stack in find_decoder_layer_lists(module))
    return len(checkpointed_layers(module)) / total if total else 0.0


class PlanWatch:
    """Tells when ``checkpointing="auto"`` has made a new plan for the model (its first training
    forward, and any batch with more tokens than planned for), so the share of recomputed layers
    that MFU counts (:func:`checkpoint_fraction_of`) can be read again: ``changed()`` is True once
    per new plan. Without an ``"auto"`` planner in the model it never is."""

    def __init__(self, module: nn.Module) -> None:
        from lightning_fastft.training.checkpointing import checkpoint_planner_of

        self._planner = checkpoint_planner_of(module)
        self._plan = None if self._planner is None else self._planner.plan

    def changed(self) -> bool:
        if self._planner is None or self._planner.plan is self._plan:
            return False
        self._plan = self._planner.plan
        return True


def _no_peak_message(device: torch.device, dtype: torch.dtype) -> str:
    where = f"GPU {torch.cuda.get_device_name(device)!r}"
    if dtype is torch.float32:
        dtype_name = "tf32" if tf32_matmuls() else "fp32 (TF32 off)"
    else:
        dtype_name = str(dtype).removeprefix("torch.")
    return (
        f"FastFTMetrics: no peak FLOP/s known for {where} computing in {dtype_name}: logging tokens/s"
        " without MFU (pass FastFTMetrics(peak_flops=...), the peak FLOP/s of one device, for MFU)"
    )


class FastFTMetrics(Callback):
    """Log ``tokens_per_sec`` (non-padding tokens), ``tokens_per_sec_total``, ``mfu`` and ``peak_mem_gib``.

    Timing covers ``on_train_batch_start`` to ``on_train_batch_end`` (CUDA synchronized), averaged
    over the last ``window`` batches. Non-padding tokens are counted by :func:`count_real_tokens`.
    Metrics go to the progress bar, and to the loggers when the trainer has any.

    Args:
        peak_flops: peak FLOP/s of one device for MFU, overriding the look-up; default: the GPU's
            dense peak for the dtype the model computes in, :func:`peak_flops_for` the device and
            :func:`compute_dtype` (bf16-true/bf16-mixed: bf16, 16-mixed: fp16, 32-true: TF32 or fp32
            as ``torch.backends.cuda.matmul`` says, 4-/8-bit base weights: their compute dtype),
            found when training starts and kept in ``available_flops`` (the dtype in
            ``compute_dtype``). Without one tokens/s are logged but no MFU (on an unlisted GPU with
            one warning; on a CPU silently).
        checkpoint_fraction: the share in [0, 1] of the decoder layers checkpointed (counts that
            much extra forward in MFU); default: :func:`checkpoint_fraction_of` the model when
            training starts (after every strategy/callback set-up), and again after each batch in
            which ``checkpointing="auto"`` made a plan (the first, and any that brought more tokens).
        window: number of recent batches the rates are averaged over.
    """

    def __init__(
        self, peak_flops: Optional[float] = None, checkpoint_fraction: Optional[float] = None, window: int = 10
    ) -> None:
        self.peak_flops = peak_flops
        self.checkpoint_fraction = checkpoint_fraction
        self.throughput = ThroughputWindow(window)
        self._batch_start = 0.0
        self.available_flops: Optional[float] = None  # the peak MFU divides by: peak_flops or looked up
        self.compute_dtype: Optional[torch.dtype] = None  # the dtype it was looked up for
        self._plans: Optional[PlanWatch] = None  # checkpoint_fraction read again on each new "auto" plan

    @staticmethod
    def _synchronize(pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.checkpoint_fraction is None:
            self._plans = PlanWatch(pl_module)
            self.checkpoint_fraction = checkpoint_fraction_of(pl_module)
        self.available_flops = self.peak_flops
        if self.available_flops is None:
            self.compute_dtype = compute_dtype(trainer, pl_module)
            self.available_flops = peak_flops_for(pl_module.device, self.compute_dtype)
            if self.available_flops is None and pl_module.device.type == "cuda":  # CPUs have no MFU to miss
                rank_zero_warn(_no_peak_message(pl_module.device, self.compute_dtype))
        self.throughput.flops_coefficients = flops_coefficients(pl_module, self.checkpoint_fraction)
        self.throughput.available_flops = self.available_flops

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._synchronize(pl_module)
        self._batch_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._synchronize(pl_module)
        elapsed = time.perf_counter() - self._batch_start
        if not (isinstance(batch, Mapping) and "input_ids" in batch):
            # batches of another kind (GRPO's prompts): the token rows the step trained on, as
            # training_step returned them; a step that returned none trained on nothing
            if not (isinstance(outputs, Mapping) and "input_ids" in outputs):
                return
            batch = outputs
        if self._plans is not None and self._plans.changed():
            self.checkpoint_fraction = checkpoint_fraction_of(pl_module)
            self.throughput.flops_coefficients = flops_coefficients(pl_module, self.checkpoint_fraction)
        self.throughput.add(elapsed, [batch_tokens(batch)])
        metrics = self.throughput.metrics(pl_module.device)
        pl_module.log_dict(
            metrics, on_step=True, on_epoch=False, prog_bar=True, logger=bool(trainer.loggers), batch_size=1
        )
