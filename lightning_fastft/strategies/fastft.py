"""The fastft strategies: Lightning's own single-device / DDP / FSDP engines plus

* the lightning_fastft patches (Triton kernels, fused LoRA, activation checkpointing/offload),
  applied to the LightningModule in ``setup`` before it is wrapped and optimizers are built;
* token-exact gradient accumulation (see :mod:`lightning_fastft.training.token_exact`);
* optional 8-bit AdamW (see :mod:`lightning_fastft.training.optim`);
* adapter-only checkpoints when parameters are frozen (see :mod:`lightning_fastft.training.adapter_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Callable, Literal, Optional, Union

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy
from torch.optim import Optimizer

from lightning_fastft._settings import pop_fields
from lightning_fastft.patching.options import PatchOptions, check_bool_options, takes_patch_options
from lightning_fastft.training.adapter_checkpoint import (
    adapter_state_dict,
    adapter_state_keys,
    check_adapter_state_dict,
    trainable_state_keys,
)
from lightning_fastft.training.optim import OPTIMIZER_CHOICES, convert_optimizers
from lightning_fastft.training.token_exact import TokenExactAccumulator, scale_gradients_


class FastFTStrategyMixin:
    """The fastft behaviour, mixed in front of a Lightning strategy class.

    Args:
        rms_norm, rope, mlp, cross_entropy, fused_lora, checkpointing, checkpoint_fraction: the
            patches (:class:`~lightning_fastft.patching.options.PatchOptions`), applied in ``setup``.
        optimizer: ``None`` keeps the optimizers of ``configure_optimizers``; ``"adamw_8bit"``
            swaps torch AdamW (and torch Adam without coupled weight decay) for bitsandbytes'
            8-bit AdamW; other optimizers stay as configured, with a warning.
        token_exact: with gradient accumulation and/or several ranks, make the gradient equal to
            the one of a single batch holding all tokens of the accumulation window. Needs
            token-level labels (see :func:`lightning_fastft.training.token_exact.count_target_tokens`); batches without
            them (e.g. classification labels) get Lightning's averaging, with one warning.
        adapter_only_checkpoint: when some parameters are frozen, checkpoints hold only the
            weights that train, trained earlier in this run or came from the resumed checkpoint;
            loading accepts the other frozen weights missing.
    """

    @takes_patch_options
    def __init__(
        self,
        *args: Any,
        optimizer: Optional[Literal["adamw_8bit"]] = None,
        token_exact: bool = True,
        adapter_only_checkpoint: bool = True,
        **kwargs: Any,
    ) -> None:
        self.patch_options = pop_fields(PatchOptions, kwargs)
        super().__init__(*args, **kwargs)
        if optimizer not in (None, *OPTIMIZER_CHOICES):
            raise ValueError(f"optimizer must be None or one of {OPTIMIZER_CHOICES}, got {optimizer!r}")
        check_bool_options(token_exact=token_exact, adapter_only_checkpoint=adapter_only_checkpoint)
        self.fastft_optimizer = optimizer
        self.token_exact = token_exact
        self.adapter_only_checkpoint = adapter_only_checkpoint
        self.patch_report: Any = None
        self._token_accumulator = TokenExactAccumulator()
        self._trained_keys: set[str] = set()  # weights that trained at some point, for adapter-only checkpoints

    # ---- patches and optimizers -------------------------------------------------------------
    def setup(self, trainer: Any) -> None:
        assert self.lightning_module is not None
        from lightning_fastft import patching

        self.patch_report = patching.patch_model(self.lightning_module, **dataclasses.asdict(self.patch_options))
        super().setup(trainer)

    def setup_optimizers(self, trainer: Any) -> None:
        super().setup_optimizers(trainer)
        if self.fastft_optimizer is not None:
            self.optimizers = convert_optimizers(self.optimizers, self.lr_scheduler_configs, self.fastft_optimizer)

    # ---- token-exact accumulation -----------------------------------------------------------
    def _token_exact_active(self) -> bool:
        module = self.lightning_module
        if not self.token_exact or module is None or module._trainer is None:
            return False
        trainer = module.trainer
        return (
            module.automatic_optimization
            and trainer.training
            and (trainer.accumulate_grad_batches > 1 or self.world_size > 1)
        )

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._token_exact_active():
            self._token_accumulator.observe_batch(args[0] if args else kwargs.get("batch"))
        return super().training_step(*args, **kwargs)

    def backward(self, closure_loss: torch.Tensor, optimizer: Optional[Optimizer], *args: Any, **kwargs: Any) -> Any:
        if optimizer is not None and self._token_exact_active():
            closure_loss = self._token_accumulator.scale_loss(closure_loss)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def optimizer_step(
        self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any
    ) -> Any:
        self._trained_keys |= trainable_state_keys(self.lightning_module)
        if self._token_exact_active():
            closure = functools.partial(self._closure_then_token_rescale, optimizer, closure)
        return super().optimizer_step(optimizer, closure, model, **kwargs)

    def _closure_then_token_rescale(self, optimizer: Optimizer, closure: Callable[[], Any]) -> Any:
        """Run the last micro-batch's closure, then rescale the window's gradients by ``k W / N_window``.

        Runs inside the precision plugin's closure, i.e. before ``on_before_optimizer_step`` and
        gradient clipping.
        """
        result = closure()
        tokens = self._token_accumulator.pop_window_tokens()
        if tokens is not None:
            window_tokens = self.reduce(tokens, reduce_op="sum")
            scale = self.lightning_module.trainer.accumulate_grad_batches * self.world_size
            factor = scale / window_tokens.clamp_min(1).to(torch.float32)
            scale_gradients_((p for group in optimizer.param_groups for p in group["params"]), factor)
        return result

    # ---- adapter-only checkpoints -----------------------------------------------------------
    def _saves_adapter_only(self) -> bool:
        return self.adapter_only_checkpoint and adapter_state_keys(self.lightning_module) is not None

    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = super().lightning_module_state_dict()
        if self.adapter_only_checkpoint:
            state = adapter_state_dict(self.lightning_module, state, self._trained_keys)
        return state

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        self._trained_keys |= checkpoint["state_dict"].keys()  # what the checkpoint holds stays in later ones
        if not self._saves_adapter_only():
            return super().load_model_state_dict(checkpoint, strict=strict)
        if strict:
            check_adapter_state_dict(self.lightning_module, checkpoint["state_dict"])
        return super().load_model_state_dict(checkpoint, strict=False)


class FastFTStrategy(FastFTStrategyMixin, SingleDeviceStrategy):
    """Single-device fastft strategy; ``device=None`` picks ``cuda:0`` on a CUDA accelerator, else the CPU.

    The fastft options are those of :class:`FastFTStrategyMixin`.
    """

    strategy_name = "fastft"

    def __init__(
        self,
        device: Optional[Union[torch.device, str, int]] = None,
        accelerator: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
        **fastft_options: Any,
    ) -> None:
        super().__init__(
            device="cpu" if device is None else device,
            accelerator=accelerator,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            **fastft_options,
        )
        self._pick_device = device is None

    @property
    def root_device(self) -> torch.device:
        if not self._pick_device:
            return self._root_device
        from lightning.pytorch.accelerators import CUDAAccelerator

        on_cuda = isinstance(self.accelerator, CUDAAccelerator) if self.accelerator else torch.cuda.is_available()
        return torch.device("cuda", 0) if on_cuda else torch.device("cpu")


class FastFTDDPStrategy(FastFTStrategyMixin, DDPStrategy):
    """Lightning's DDP with the fastft options of :class:`FastFTStrategyMixin`."""

    strategy_name = "fastft_ddp"


class FastFTFSDPStrategy(FastFTStrategyMixin, FSDPStrategy):
    """Lightning's FSDP with the fastft options of :class:`FastFTStrategyMixin`.

    FSDP loads the model weights inside ``load_checkpoint``; for adapter-only checkpoints that
    load is non-strict (missing trainable weights are not reported there).
    """

    strategy_name = "fastft_fsdp"

    def setup(self, trainer: Any) -> None:
        refuse_4bit_layers(self.lightning_module)
        super().setup(trainer)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        # FSDP has loaded the weights in ``load_checkpoint`` already
        FSDPStrategy.load_model_state_dict(self, checkpoint, strict=strict)

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        if not self._saves_adapter_only():
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        module = self.lightning_module
        strict_loading = module._strict_loading
        module.strict_loading = False
        try:
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        finally:
            module._strict_loading = strict_loading


def refuse_4bit_layers(module: torch.nn.Module) -> None:
    """Raise ``ValueError`` naming the first bitsandbytes 4-bit layer in ``module``: Lightning's FSDP
    (FSDP1) flattens each unit's parameters into one tensor and cannot take 4-bit weights (torch
    fails later with "Cannot flatten integer dtype tensors")."""
    from lightning_fastft.bnb import is_4bit_linear

    for name, layer in module.named_modules():
        if is_4bit_linear(layer):
            raise ValueError(
                f"fastft_fsdp: {name} is a bitsandbytes 4-bit layer (QLoRA), which Lightning's FSDP cannot shard "
                "(it flattens each unit's weights into one tensor); train QLoRA with strategy='fastft' or 'fastft_ddp'"
            )


STRATEGY_NAMES = {
    "fastft": (FastFTStrategy, {}),
    "fastft_ddp": (FastFTDDPStrategy, {"start_method": "popen"}),
    "fastft_ddp_spawn": (FastFTDDPStrategy, {"start_method": "spawn"}),
    "fastft_fsdp": (FastFTFSDPStrategy, {}),
}


def register_strategies() -> None:
    """Register the ``fastft*`` names in Lightning's ``StrategyRegistry`` (safe to call repeatedly)."""
    from lightning.pytorch.strategies import StrategyRegistry

    for name, (strategy_class, init_params) in STRATEGY_NAMES.items():
        StrategyRegistry.register(
            name, strategy_class, description=strategy_class.__doc__.split("\n")[0], override=True, **init_params
        )
