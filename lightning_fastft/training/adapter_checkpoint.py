"""Adapter-only checkpoints: when part of the model is frozen (LoRA), save only what trains.

The frozen base weights are re-created by the module itself (loaded from the pretrained
files, or drawn from the same seed), so checkpoints hold the weights that train (+ optimizer
state) only, and loading tolerates exactly the frozen weights being absent. Weights that trained
and were frozen later are kept too: the strategy passes them as ``trained``.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Any

from torch import nn

# prefixes that wrappers (FSDP, activation checkpointing) insert into parameter names but
# strip from their state dicts
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _state_dict_name(parameter_name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        parameter_name = parameter_name.replace(prefix, "")
    return parameter_name


def trainable_state_keys(module: nn.Module) -> set[str]:
    """State-dict keys of the parameters of ``module`` that require grad now."""
    return {_state_dict_name(n) for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}


def adapter_state_keys(module: nn.Module, trained: Set[str] = frozenset()) -> set[str] | None:
    """Keys an adapter-only checkpoint keeps: the trainable parameters plus ``trained`` (weights that
    trained earlier and were frozen since). ``None`` when nothing is frozen, or nothing trains: keep all."""
    trainable = trainable_state_keys(module)
    parameters = {_state_dict_name(n) for n, _ in module.named_parameters(remove_duplicate=False)}
    if not trainable or trainable == parameters:
        return None
    return trainable | (trained & parameters)


def adapter_state_dict(
    module: nn.Module, state_dict: Mapping[str, Any], trained: Set[str] = frozenset()
) -> dict[str, Any]:
    """``state_dict`` restricted to :func:`adapter_state_keys` (all of it if nothing is frozen)."""
    keys = adapter_state_keys(module, trained)
    if keys is None:
        return dict(state_dict)
    return {name: value for name, value in state_dict.items() if name in keys}


def check_adapter_state_dict(module: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Raise unless ``state_dict`` holds every trainable weight of ``module`` and nothing unknown.

    Frozen weights may be missing (adapter-only checkpoint); when nothing is frozen, every
    parameter is required.
    """
    parameters = {_state_dict_name(n) for n, _ in module.named_parameters(remove_duplicate=False)}
    known = parameters | {_state_dict_name(n) for n, _ in module.named_buffers(remove_duplicate=False)}
    missing = sorted((trainable_state_keys(module) or parameters) - state_dict.keys())
    unexpected = sorted(state_dict.keys() - known)
    if missing or unexpected:
        raise RuntimeError(
            f"Checkpoint does not match the model: missing trainable weights {missing[:8]}, "
            f"unexpected keys {unexpected[:8]} (showing at most 8 of each)."
        )
