"""Reward functions and group-normalised advantages for GRPO.

A reward function is a plain callable ``f(prompts, completions, **columns) -> list[float | None]``
(TRL's convention): ``prompts`` and ``completions`` are lists of strings with one entry per
completion (each prompt repeated ``num_generations`` times), ``columns`` the dataset's other
columns, repeated the same way. ``None`` means "does not apply to this completion" (as in TRL: it
is left out of the weighted sum; a completion no function scores gets advantage 0).

Advantages (TRL's default ``multi_objective_aggregation="sum_then_normalize"``), for ``G``
completions per prompt and weights ``w_k``::

    r_i   = sum_k w_k R_ik                     (the None entries left out)
    A_i   = r_i - mean_{j in group(i)} r_j
    A_i  /= std_{group(i)}(r) + 1e-4           scale_rewards="group"  (unbiased std, as torch.std)
    A_i  /= std_{batch}(r) + 1e-4              scale_rewards="batch"
                                               scale_rewards="none": no division (Dr. GRPO)
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, Union

import torch

RewardFunction = Callable[..., Sequence[Union[float, None]]]
ScaleRewards = Literal["group", "batch", "none"]
SCALE_REWARDS: tuple[str, ...] = ("group", "batch", "none")
ADVANTAGE_EPS = 1e-4  # TRL's: added to the std before dividing


def reward_function_name(function: RewardFunction) -> str:
    """The name rewards are logged under: ``__name__``, or the class name of a callable object."""
    return getattr(function, "__name__", type(function).__name__)


def resolve_reward_function(function: Union[str, RewardFunction]) -> RewardFunction:
    """A callable, or an import path ``"package.module.function"`` (the form a YAML config holds)."""
    if callable(function):
        return function
    if not isinstance(function, str) or "." not in function:
        raise TypeError(f"a reward function is a callable or an import path 'module.name', got {function!r}")
    module_name, _, attribute = function.rpartition(".")
    try:
        resolved = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import reward function {function!r}: {error}") from error
    if not callable(resolved):
        raise TypeError(f"reward function {function!r} is not callable")
    return resolved


def score_completions(
    functions: Sequence[RewardFunction], prompts: list[str], completions: list[str], columns: dict[str, list[Any]]
) -> torch.Tensor:
    """``(len(completions), len(functions))`` fp32 rewards, NaN where a function returned None.

    Raises ``ValueError`` naming the function for a result of the wrong length or type, or a NaN /
    infinite reward (a NaN would silently turn every advantage of its group into NaN).
    """
    rewards = torch.empty(len(completions), len(functions), dtype=torch.float32)
    for k, function in enumerate(functions):
        name = reward_function_name(function)
        values = function(prompts=prompts, completions=completions, **columns)
        if values is None or isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
            raise ValueError(f"reward function {name!r} must return a list of floats, got {type(values).__name__}")
        if len(values) != len(completions):
            raise ValueError(
                f"reward function {name!r} returned {len(values)} rewards for {len(completions)} completions"
            )
        for i, value in enumerate(values):
            if value is None:
                rewards[i, k] = math.nan
                continue
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"reward function {name!r} returned {value!r} (a {type(value).__name__}) at {i}")
            if not math.isfinite(value):
                raise ValueError(
                    f"reward function {name!r} returned {value} for completion {i} ({completions[i]!r}): "
                    "rewards must be finite (return None where the function does not apply)"
                )
            rewards[i, k] = float(value)
    return rewards


def weighted_rewards(rewards_per_function: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(N,)`` rewards ``sum_k w_k R_ik`` of ``(N, F)`` rewards, the NaN (not applicable) entries left
    out; NaN for a completion no function scored."""
    if weights.shape != rewards_per_function.shape[1:]:
        raise ValueError(f"{weights.numel()} reward weights for {rewards_per_function.shape[1]} reward functions")
    rewards = (rewards_per_function * weights.to(rewards_per_function)).nansum(dim=1)
    return rewards.masked_fill(torch.isnan(rewards_per_function).all(dim=1), math.nan)


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale_rewards: ScaleRewards = "group",
    batch_std: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(N,)`` advantages of ``(N,)`` rewards (:func:`weighted_rewards`; NaN: unscored) whose entries come
    in groups of ``num_generations`` consecutive completions of one prompt (formula in the module
    docstring). ``batch_std``: for ``scale_rewards="batch"``, the std of the rewards of the whole
    batch across ranks (default: of these). A completion no function scored gets advantage 0.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} completions are not groups of num_generations={num_generations}")
    grouped = rewards.view(-1, num_generations)
    advantages = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    if scale_rewards == "group":
        advantages = advantages / (nanstd(grouped, dim=1, keepdim=True) + ADVANTAGE_EPS)
    elif scale_rewards == "batch":
        std = nanstd(rewards) if batch_std is None else batch_std.to(rewards)
        advantages = advantages / (std + ADVANTAGE_EPS)
    return torch.nan_to_num(advantages.reshape(-1), nan=0.0)


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased standard deviation ignoring NaN (0 where fewer than two values); all of ``x`` when
    ``dim`` is None."""
    if dim is None:
        return nanstd(x.reshape(-1), 0)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    squares = ((x - torch.nanmean(x, dim=dim, keepdim=True)) ** 2).nansum(dim=dim, keepdim=True)
    std = (squares / (count - 1).clamp(min=1)).sqrt()
    return std if keepdim else std.squeeze(dim)


def warn_unscored(rewards_per_function: torch.Tensor, names: Sequence[str]) -> None:
    """One warning per call naming the functions that returned None for every completion."""
    missing = [name for k, name in enumerate(names) if torch.isnan(rewards_per_function[:, k]).all()]
    if missing:
        warnings.warn(f"reward functions {missing} returned None for every completion of this batch", stacklevel=3)


def reference_match(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """1.0 for a completion equal to its ``answer`` column (after stripping whitespace), else partial
    credit: the share of the answer's characters matched position by position, halved, minus a
    length penalty ``0.5 |len(completion) - len(answer)| / max(len(answer), 1)`` (floored at 0).
    Exact answers always score highest; useful for tasks with one right string (e.g. the demo's
    word reversal)."""
    scores = []
    for completion, target in zip(completions, answer):
        completion, target = completion.strip(), str(target).strip()
        if completion == target:
            scores.append(1.0)
            continue
        width = max(len(target), 1)
        matched = sum(a == b for a, b in zip(completion, target)) / width
        penalty = abs(len(completion) - len(target)) / width
        scores.append(max(0.0, 0.5 * matched - 0.5 * penalty))
    return scores
