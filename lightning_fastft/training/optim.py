"""Swap the torch AdamW optimizers a LightningModule configures for bitsandbytes' 8-bit AdamW.

The 8-bit optimizer keeps both Adam moments block-wise quantized to uint8 (2 bytes/param
instead of 8), with the same update rule and hyper-parameters. A torch ``Adam`` converts too
when its update is AdamW's: no weight decay, or ``decoupled_weight_decay=True`` (bitsandbytes
applies weight decay decoupled, so Adam's coupled L2 decay has no 8-bit equivalent).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Callable

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch.optim import Optimizer

OPTIMIZER_CHOICES = ("adamw_8bit",)


def _adamw_8bit_class() -> type[Optimizer]:
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit


def _track_step_calls(optimizer: Optimizer) -> None:
    """Install on ``optimizer.step`` the call marker torch's LR schedulers put on the optimizer they get.

    Without it a scheduler re-pointed to ``optimizer`` warns that ``optimizer.step()`` was overridden.
    """
    step = optimizer.step

    @functools.wraps(step)
    def step_and_mark(*args: Any, **kwargs: Any) -> Any:
        optimizer._opt_called = True  # type: ignore[attr-defined]
        return step(*args, **kwargs)

    step_and_mark._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = step_and_mark  # type: ignore[method-assign]


def has_adamw_update(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` is a torch ``AdamW``, or a torch ``Adam`` without coupled weight decay."""
    if type(optimizer) is torch.optim.AdamW:
        return True
    return type(optimizer) is torch.optim.Adam and all(
        group.get("decoupled_weight_decay") or group["weight_decay"] == 0 for group in optimizer.param_groups
    )


def to_8bit_adamw(optimizer: Optimizer, optimizer_class: Callable[..., Optimizer] | None = None) -> Optimizer:
    """An 8-bit AdamW over the same parameter groups and hyper-parameters as the optimizer given,
    when :func:`has_adamw_update`; other optimizers are returned unchanged.

    ``optimizer_class`` defaults to ``bitsandbytes.optim.AdamW8bit``.
    """
    if not has_adamw_update(optimizer):
        return optimizer
    if optimizer.state:
        raise ValueError("to_8bit_adamw converts fresh optimizers only; this one already has state.")
    defaults = optimizer.defaults
    if any(group.get("amsgrad") or group.get("maximize") for group in optimizer.param_groups):
        raise ValueError("8-bit AdamW supports neither amsgrad nor maximize.")
    optimizer_class = optimizer_class or _adamw_8bit_class()
    groups = [dict(group) for group in optimizer.param_groups]
    return optimizer_class(
        groups,
        lr=defaults["lr"],
        betas=defaults["betas"],
        eps=defaults["eps"],
        weight_decay=defaults["weight_decay"],
    )


def convert_optimizers(
    optimizers: Sequence[Optimizer],
    lr_scheduler_configs: Sequence[Any],
    optimizer: str,
    optimizer_class: Callable[..., Optimizer] | None = None,
) -> list[Optimizer]:
    """Replace every optimizer of ``optimizers`` with AdamW's update (:func:`has_adamw_update`) by
    its ``optimizer`` variant (``"adamw_8bit"``); warn about each other one, which stays as is
    (unless it already is an ``optimizer_class``).

    LR schedulers (Lightning ``LRSchedulerConfig``s) stepping a replaced optimizer are
    re-pointed to the new one. Returns the new optimizer list.
    """
    if optimizer not in OPTIMIZER_CHOICES:
        raise ValueError(f"optimizer must be one of {OPTIMIZER_CHOICES} or None, got {optimizer!r}")
    optimizer_class = optimizer_class or _adamw_8bit_class()
    converted = []
    for old in optimizers:
        new = to_8bit_adamw(old, optimizer_class)
        if new is old and not isinstance(old, optimizer_class):
            rank_zero_warn(
                f"optimizer={optimizer!r} keeps the {type(old).__module__}.{type(old).__qualname__} that "
                "configure_optimizers returned: only torch.optim.AdamW, and torch.optim.Adam without coupled "
                "weight decay (weight_decay=0 or decoupled_weight_decay=True), convert to 8-bit AdamW with "
                "the same update rule."
            )
        if new is not old:
            schedulers = [c.scheduler for c in lr_scheduler_configs if c.scheduler.optimizer is old]
            for scheduler in schedulers:
                scheduler.optimizer = new
            if schedulers:
                _track_step_calls(new)
        converted.append(new)
    return converted
