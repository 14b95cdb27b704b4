"""Token-exact gradient accumulation.

HF causal LMs return the *mean* cross-entropy over a micro-batch's target tokens. Averaging
those means over ``k`` accumulated micro-batches (and over ``W`` data-parallel ranks) weights
every micro-batch equally, so a token in a short micro-batch counts more than one in a long
micro-batch. The gradient of one big batch holding every token is instead

    g = (1 / N_window) * sum_i n_i * grad(mean_loss_i),   N_window = sum_i n_i over all ranks.

Lightning divides each micro-batch loss by ``k`` and DDP/FSDP average gradients over ``W``
ranks, so backpropagating ``n_i * mean_loss_i / k`` gives ``sum_i n_i grad(mean_i) / (k W)``;
multiplying every gradient by ``k W / N_window`` right before the optimizer step (before
clipping) yields ``g`` exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn

from lightning_fastft.constants import IGNORE_INDEX


def _token_level(labels: Any, batch: Mapping[str, Any]) -> bool:
    """Integer labels with a sequence dimension, shaped like ``input_ids`` when the batch has them."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.ndim < 2:
        return False
    input_ids = batch.get("input_ids")
    return not isinstance(input_ids, torch.Tensor) or input_ids.shape == labels.shape


def count_target_tokens(batch: Any) -> torch.Tensor | None:
    """Number of tokens that contribute to the loss of a ``{"labels" | "shift_labels": ...}`` batch.

    ``shift_labels`` (already aligned with the logits) is counted as is; ``labels`` are shifted
    by one like HF's causal-LM loss does. ``None`` when the batch carries no token-level labels
    (integer, ``(batch, sequence)``-shaped like ``input_ids``), e.g. classification labels ``(batch,)``.
    """
    if not isinstance(batch, Mapping):
        return None
    if _token_level(batch.get("shift_labels"), batch):
        return (batch["shift_labels"] != IGNORE_INDEX).sum()
    if _token_level(batch.get("labels"), batch):
        return (batch["labels"][..., 1:] != IGNORE_INDEX).sum()
    return None


def scale_gradients_(params: Iterable[torch.Tensor], factor: torch.Tensor) -> None:
    """Multiply, in place, the gradient of every parameter that has one by ``factor`` (0-dim)."""
    grads_by_device: dict[torch.device, list[torch.Tensor]] = {}
    for param in params:
        if param.grad is not None:
            grads_by_device.setdefault(param.grad.device, []).append(param.grad)
    for device, grads in grads_by_device.items():
        torch._foreach_mul_(grads, factor.to(device))


class TokenExactAccumulator:
    """Book-keeping of the target tokens seen in the current accumulation window (one rank)."""

    def __init__(self) -> None:
        self.micro_batch_tokens: torch.Tensor | None = None
        self.window_tokens: torch.Tensor | None = None
        self.window_has_unlabelled = False
        self.warned_unlabelled = False

    def observe_batch(self, batch: Any) -> None:
        self.micro_batch_tokens = count_target_tokens(batch)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * n_i`` (mean -> sum) and add ``n_i`` to the window; unlabelled batches pass as is
        (Lightning's averaging of the micro-batch losses), with one warning."""
        tokens = self.micro_batch_tokens
        self.micro_batch_tokens = None
        if tokens is None:
            self.window_has_unlabelled = True
            if not self.warned_unlabelled:
                self.warned_unlabelled = True
                rank_zero_warn(
                    "token_exact: a training batch has no token-level 'labels'/'shift_labels' (integer, shaped "
                    "like input_ids) to count target tokens from, so its loss is averaged over micro-batches and "
                    "ranks as Lightning does. Set token_exact=False to silence this."
                )
            return loss
        tokens = tokens.to(loss.device)
        self.window_tokens = tokens if self.window_tokens is None else self.window_tokens + tokens
        return loss * tokens.to(loss.dtype)

    def pop_window_tokens(self) -> torch.Tensor | None:
        """This rank's target tokens of the finished window (``None`` if none were counted)."""
        tokens, mixed = self.window_tokens, self.window_has_unlabelled
        self.window_tokens, self.window_has_unlabelled = None, False
        if tokens is not None and mixed:
            raise RuntimeError(
                "token_exact accumulation: some micro-batches of this accumulation window have no "
                "'labels'/'shift_labels' to count target tokens from; pass labels in every batch or "
                "set token_exact=False."
            )
        return tokens
