"""lightning_fastft for a plain ``transformers.Trainer`` (and TRL's ``SFTTrainer``, a subclass), in two lines::

    from lightning_fastft.integrations.hf import FastFTCallback, prepare_model

    model = prepare_model(model, checkpointing="recompute")  # a HF causal LM or a PEFT model
    trainer = FastFTCallback().attach(Trainer(model=model, args=args, train_dataset=...))

:func:`prepare_model` patches the model in place (per instance, as
:func:`~lightning_fastft.patching.model.patch_model`) with the
:class:`~lightning_fastft.patching.options.PatchOptions` given as keywords. :class:`FastFTCallback`
adds ``tokens_per_sec``, ``tokens_per_sec_total``, ``mfu`` (where the device's peak is known) and
``peak_mem_gib`` (CUDA only) to every log the Trainer writes; :meth:`FastFTCallback.attach` puts
it ahead of the reporting callbacks (``report_to``: wandb, tensorboard, ...), so they get the
metrics too. The metrics are those of the Lightning callback
:class:`~lightning_fastft.callbacks.metrics.FastFTMetrics`, computed by the same
:class:`~lightning_fastft.callbacks.metrics.ThroughputWindow`.

Token-exact gradient accumulation: the Trainer passes ``num_items_in_batch`` (the target tokens of
the whole accumulation window) to the model's forward when that forward takes ``**kwargs``. The
patched causal-LM forward does, and hands it to the fused cross-entropy, which returns the
window-normalised sum exactly as Hugging Face's ``ForCausalLMLoss`` does; the Trainer then skips
its division by ``gradient_accumulation_steps`` as for an unpatched model. Nothing else is needed.

Activation checkpointing: with ``checkpointing`` set, lightning_fastft checkpoints the decoder
layers and Hugging Face's own gradient checkpointing (``TrainingArguments(gradient_checkpointing=True)``,
``activation_checkpointing=True``) is *not* added on top: it is switched off where it was already on,
and the model's ``activation_checkpointing_enable`` / ``gradient_checkpointing_enable`` (which the
Trainer calls when training starts) only warn while lightning_fastft's checkpointing is in place.
Without ``checkpointing``, Hugging Face's gradient checkpointing, if asked for, runs the patched
layers as it would the original ones.
"""

from __future__ import annotations

import functools
import time
import warnings
from typing import Any, TypeVar

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback

from lightning_fastft._hf import unwrap_peft
from lightning_fastft.callbacks.metrics import (
    PlanWatch,
    ThroughputWindow,
    batch_tokens,
    checkpoint_fraction_of,
    flops_coefficients,
    peak_flops_for,
    weights_compute_dtype,
)
from lightning_fastft.patching.model import (
    InstanceForward,
    PatchReport,
    is_causal_lm,
    patch_model,
)
from lightning_fastft.patching.options import (
    PatchOptions,
    check_checkpoint_fraction,
    takes_patch_options,
)
from lightning_fastft.training.checkpointing import (
    checkpointed_layers,
    disable_hf_gradient_checkpointing,
    hf_gradient_checkpointing_on,
)

__all__ = ["FastFTCallback", "is_prepared", "patch_report", "prepare_model"]

_TrainerT = TypeVar("_TrainerT", bound=Trainer)

REPORT_ATTRIBUTE = "fastft_patch_report"
"""The attribute :func:`prepare_model` stores its :class:`PatchReport` under, on the model it returns."""

_HF_CHECKPOINTING_METHODS = (
    "activation_checkpointing_enable",
    "gradient_checkpointing_enable",
)


@takes_patch_options
def prepare_model(model: nn.Module, **options: Any) -> nn.Module:
    """Patch the Hugging Face causal LM(s) inside ``model`` for training with ``transformers.Trainer``.

    ``model``: a transformers causal LM (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2) or a PEFT
    model around one. ``options``: the :class:`~lightning_fastft.patching.options.PatchOptions`
    fields (``rms_norm``, ``rope``, ``mlp``, ``cross_entropy``, ``fused_lora``, ``checkpointing``,
    ``checkpoint_fraction``); an unknown name raises ``TypeError``, a bad value ``TypeError`` /
    ``ValueError``.

    Returns ``model`` itself, patched in place (module instances only, parameters untouched: call
    it before or after building the optimizer), with the
    :class:`~lightning_fastft.patching.model.PatchReport` as ``model.fastft_patch_report``
    (:func:`patch_report`). An architecture without a patching spec is left to Hugging Face's
    code, with a warning. With ``checkpointing`` set, Hugging Face's gradient checkpointing is
    switched off where on, and kept off when the Trainer enables it (see the module docstring).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or holds no transformers causal LM; unknown options.
        ValueError: an option value out of range (``checkpointing``, ``checkpoint_fraction``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_model expects a transformers causal LM or a PEFT model, got {type(model).__name__}")
    PatchOptions(**options)  # validate before anything changes
    if not any(is_causal_lm(module) for module in model.modules()):
        raise TypeError(
            f"prepare_model: no transformers causal LM (a PreTrainedModel with generate) inside "
            f"{type(model).__name__}; pass the *ForCausalLM model or the PEFT model around it"
        )
    with warnings.catch_warnings():
        # apply_activation_checkpointing's own warning names the function, not the Trainer flag
        warnings.filterwarnings("ignore", message="lightning_fastft: turning off HF gradient checkpointing")
        was_on = hf_gradient_checkpointing_on(model)
        report = patch_model(model, **options)
    if was_on and checkpointed_layers(model):
        warnings.warn(
            "lightning_fastft: Hugging Face gradient checkpointing was on; it is switched off and the decoder "
            f"layers are checkpointed by lightning_fastft (checkpointing={options.get('checkpointing')!r}) instead.",
            stacklevel=2,
        )
    _guard_hf_checkpointing(model)
    setattr(model, REPORT_ATTRIBUTE, report)
    return model


def patch_report(model: nn.Module) -> PatchReport | None:
    """The :class:`~lightning_fastft.patching.model.PatchReport` of :func:`prepare_model` on ``model``
    (or on a model inside it), ``None`` when it was not prepared."""
    for module in model.modules():
        report = module.__dict__.get(REPORT_ATTRIBUTE)
        if report is not None:
            return report
    return None


def is_prepared(model: nn.Module) -> bool:
    """Whether any module inside ``model`` runs a lightning_fastft patched forward."""
    return any(isinstance(module.__dict__.get("forward"), InstanceForward) for module in model.modules())


def _guard_hf_checkpointing(model: nn.Module) -> None:
    """Give ``model`` and every transformers model inside it instance-level
    ``activation_checkpointing_enable`` / ``gradient_checkpointing_enable`` that refuse (with a
    warning) while lightning_fastft checkpoints the decoder layers, and else run Hugging Face's."""
    targets = [model] + [m for m in model.modules() if isinstance(m, PreTrainedModel) and m is not model]
    for module in targets:
        for name in _HF_CHECKPOINTING_METHODS:
            if name in module.__dict__ or not hasattr(module, name):
                continue
            module.__dict__[name] = functools.partial(_hf_checkpointing_enable, module, name)


def _hf_checkpointing_enable(module: nn.Module, name: str, *args: Any, **kwargs: Any) -> Any:
    if checkpointed_layers(module):
        warnings.warn(
            f"lightning_fastft: ignoring {name}() (e.g. TrainingArguments(gradient_checkpointing=True)): "
            "the decoder layers are already checkpointed by lightning_fastft (prepare_model(checkpointing=...)); "
            "checkpointing them twice would run every forward three times.",
            stacklevel=3,
        )
        return None
    method = getattr(type(module), name, None)
    if method is not None:
        return method(module, *args, **kwargs)
    return getattr(unwrap_peft(module), name)(*args, **kwargs)  # a PeftModel: its base model's


class FastFTCallback(TrainerCallback):
    """``transformers.TrainerCallback`` adding throughput, MFU and peak memory to the Trainer's logs.

    Every time the Trainer logs (``logging_steps``), the log gets, per device, over the last
    ``window`` optimizer steps (:class:`~lightning_fastft.callbacks.metrics.ThroughputWindow`):

    * ``tokens_per_sec``: non-padding tokens (:func:`~lightning_fastft.callbacks.metrics.count_real_tokens`
      of each micro-batch the model is called with) per second of step time;
    * ``tokens_per_sec_total``: all tokens, padding included;
    * ``mfu``: model FLOPs utilisation (:func:`~lightning_fastft.callbacks.metrics.flops_coefficients`),
      when the peak FLOP/s is known: ``peak_flops`` or the GPU's dense peak
      (:func:`~lightning_fastft.callbacks.metrics.peak_flops_for`) for the dtype it computes in
      (``bf16=True``: bf16, ``fp16=True``: fp16, else the weights' dtype; fp32 counts as TF32
      when TF32 matmuls are on). Not on a CPU;
    * ``peak_mem_gib``: ``torch.cuda.max_memory_allocated`` of the training device (CUDA only).

    Step time runs from ``on_step_begin`` to ``on_step_end`` (CUDA synchronized): the forward,
    backward and optimizer step of all micro-batches of the step, not data loading or logging.
    The metrics go into the ``logs`` dict of ``on_log`` and into ``state.log_history``.

    Add it with :meth:`attach` (``FastFTCallback().attach(trainer)``): the Trainer calls the
    reporting callbacks it makes from ``report_to`` (wandb, tensorboard, ...) before the callbacks
    passed as ``Trainer(callbacks=[...])``, which would add the metrics to a log those have already
    sent; ``attach`` puts this callback first. Passed in ``callbacks=`` with ``report_to`` set, it
    warns when training starts that the reporters miss the metrics.

    It also switches off Hugging Face's gradient checkpointing where the model's decoder layers are
    checkpointed by lightning_fastft (:func:`prepare_model` ``checkpointing``), with a warning, and
    warns when the model was not prepared (the metrics are logged all the same).

    Args:
        peak_flops: peak FLOP/s of one device for MFU, overriding the look-up (> 0).
        checkpoint_fraction: the share in [0, 1] of decoder layers whose forward is recomputed
            (extra FLOPs in MFU); default: read from the model when training starts.
        window: number of recent optimizer steps the rates are averaged over (>= 1).
    """

    def __init__(
        self,
        peak_flops: float | None = None,
        checkpoint_fraction: float | None = None,
        window: int = 10,
    ) -> None:
        if peak_flops is not None and (
            isinstance(peak_flops, bool) or not isinstance(peak_flops, (int, float)) or not peak_flops > 0
        ):
            raise ValueError(f"peak_flops must be a positive number of FLOP/s, got {peak_flops!r}")
        if checkpoint_fraction is not None:
            check_checkpoint_fraction(checkpoint_fraction, allow_zero=True)
        self.peak_flops = peak_flops
        self.checkpoint_fraction = checkpoint_fraction
        self.throughput = ThroughputWindow(window)
        self.available_flops: float | None = None  # the peak MFU divides by: peak_flops or looked up
        self.compute_dtype: torch.dtype | None = None  # the dtype it was looked up for
        self.metrics: dict[str, float] = {}  # the latest metrics, as last added to the logs
        self._micro_batches: list[tuple[int, int, int]] = []  # batch_tokens of this step's micro-batches
        self._step_start: float | None = None
        self._device: torch.device | None = None
        self._model: nn.Module | None = None
        self._plans: PlanWatch | None = None  # the recomputed share read again on each new "auto" plan
        self._hook: Any = None
        self._first = False  # attached ahead of the reporting callbacks

    def attach(self, trainer: _TrainerT) -> _TrainerT:
        """Add this callback to ``trainer`` ahead of every other callback (so the reporting callbacks
        see its metrics in the same log) and return ``trainer``."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        self._first = True
        return trainer

    # ------------------------------------------------------------------ set-up

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is None:
            raise ValueError("FastFTCallback: the Trainer passed no model to on_train_begin")
        if not self._first and _reporting_to(args):
            warnings.warn(
                f"FastFTCallback was passed in Trainer(callbacks=...): the reporting callbacks ({args.report_to}) "
                "run before it and log without tokens_per_sec/mfu; add it with FastFTCallback().attach(trainer) "
                "to have them reported.",
                stacklevel=2,
            )
        if checkpointed_layers(model) and hf_gradient_checkpointing_on(model):
            warnings.warn(
                "lightning_fastft: turning off Hugging Face gradient checkpointing; the decoder layers are "
                "checkpointed by lightning_fastft (prepare_model(checkpointing=...)) instead.",
                stacklevel=2,
            )
            disable_hf_gradient_checkpointing(model)
        if not is_prepared(model):
            warnings.warn(
                "FastFTCallback: the model runs no lightning_fastft patch (call "
                "lightning_fastft.integrations.hf.prepare_model(model) before building the Trainer); "
                "logging tokens/s and memory for Hugging Face's own code.",
                stacklevel=2,
            )
        self._device = torch.device(args.device)
        fraction = self.checkpoint_fraction
        self._model, self._plans = model, None
        if fraction is None:
            self._plans = PlanWatch(model)
            fraction = checkpoint_fraction_of(model)
        self.throughput.flops_coefficients = flops_coefficients(model, fraction)
        self.available_flops = self.peak_flops
        if self.available_flops is None:
            self.compute_dtype = _compute_dtype(args, model)
            self.available_flops = peak_flops_for(self._device, self.compute_dtype)
            if self.available_flops is None and self._device.type == "cuda":
                warnings.warn(
                    f"FastFTCallback: no peak FLOP/s known for {torch.cuda.get_device_name(self._device)!r} "
                    f"computing in {self.compute_dtype}: logging tokens/s without MFU (pass "
                    "FastFTCallback(peak_flops=...), the peak FLOP/s of one device, for MFU)",
                    stacklevel=2,
                )
        self.throughput.available_flops = self.available_flops
        self.throughput.steps.clear()
        self._remove_hook()
        self._hook = model.register_forward_pre_hook(self._count_batch, with_kwargs=True)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hook()

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ------------------------------------------------------------------ measuring

    def _count_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not (module.training and torch.is_grad_enabled() and self._step_start is not None):
            return
        batch = dict(kwargs)
        if "input_ids" not in batch and args and isinstance(args[0], torch.Tensor):
            batch["input_ids"] = args[0]
        if not isinstance(batch.get("input_ids"), torch.Tensor):
            return  # inputs_embeds only: nothing to count tokens by
        self._micro_batches.append(batch_tokens(batch))

    def _synchronize(self) -> None:
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def on_step_begin(self, args, state, control, **kwargs):
        self._synchronize()
        self._micro_batches = []
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_start is None:
            return
        self._synchronize()
        elapsed = time.perf_counter() - self._step_start
        self._step_start = None
        if self._plans is not None and self._plans.changed():  # checkpointing="auto" planned this step
            self.throughput.flops_coefficients = flops_coefficients(self._model, checkpoint_fraction_of(self._model))
        if self._micro_batches:
            self.throughput.add(elapsed, self._micro_batches)
        self._micro_batches = []

    def current_metrics(self) -> dict[str, float]:
        """The metrics over the last ``window`` optimizer steps (empty before the first step)."""
        return self.throughput.metrics(self._device)

    def on_log(self, args, state, control, logs: dict | None = None, **kwargs):
        if logs is None or "loss" not in logs:  # training logs only: not eval/predict/final summary
            return
        self.metrics = self.current_metrics()
        if not self.metrics:
            return
        logs.update(self.metrics)
        # Trainer.log appended {**logs, "step": ...} to the history before calling on_log
        if state.log_history:
            last = state.log_history[-1]
            if last.get("step") == state.global_step and all(last.get(k) == v for k, v in logs.items() if k in last):
                last.update(self.metrics)


def _reporting_to(args: Any) -> bool:
    """Whether the Trainer arguments name reporting integrations (``report_to`` other than none)."""
    report_to = getattr(args, "report_to", None) or []
    if isinstance(report_to, str):
        report_to = [report_to]
    return any(name not in ("none", None) for name in report_to)


def _compute_dtype(args: Any, model: nn.Module) -> torch.dtype:
    """The dtype the model's matmuls run in under ``args``: the autocast dtype with ``bf16`` /
    ``fp16``, else the dtype of most matmul weights (quantised ones by their compute dtype)."""
    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return weights_compute_dtype(model) or torch.float32
