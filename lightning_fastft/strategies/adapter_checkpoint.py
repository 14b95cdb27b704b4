"""Adapter-only checkpoints: when part of the model is frozen (LoRA), save only what trains.

The frozen base weights are re-created by the module itself (loaded from the pretrained
files, or drawn from the same seed), so checkpoints hold the trainable weights (+ optimizer
state) only, and loading tolerates exactly those frozen weights being absent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

# prefixes that wrappers (FSDP, activation checkpointing) insert into parameter names but
# strip from their state dicts
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _state_dict_name(parameter_name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        parameter_name = parameter_name.replace(prefix, "")
    return parameter_name


def trainable_state_keys(module: nn.Module) -> set[str] | None:
    """State-dict keys of the trainable parameters, or ``None`` when nothing is frozen (or nothing trains)."""
    trainable, frozen = set(), False
    for name, param in module.named_parameters(remove_duplicate=False):
        if param.requires_grad:
            trainable.add(_state_dict_name(name))
        else:
            frozen = True
    return trainable if frozen and trainable else None


def adapter_state_dict(module: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` restricted to ``module``'s trainable parameters (all of it if nothing is frozen)."""
    keys = trainable_state_keys(module)
    if keys is None:
        return dict(state_dict)
    return {name: value for name, value in state_dict.items() if name in keys}


def check_adapter_state_dict(module: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Raise unless ``state_dict`` holds every trainable weight of ``module`` and nothing unknown.

    Frozen weights may be missing (adapter-only checkpoint).
    """
    parameters = {_state_dict_name(n) for n, _ in module.named_parameters(remove_duplicate=False)}
    known = parameters | {_state_dict_name(n) for n, _ in module.named_buffers(remove_duplicate=False)}
    trainable = trainable_state_keys(module) or parameters
    missing = sorted(trainable - state_dict.keys())
    unexpected = sorted(state_dict.keys() - known)
    if missing or unexpected:
        raise RuntimeError(
            f"Checkpoint does not match the model: missing trainable weights {missing[:8]}, "
            f"unexpected keys {unexpected[:8]} (showing at most 8 of each)."
        )
