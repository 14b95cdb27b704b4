"""Finding and unwrapping the Hugging Face models inside the modules users hand us
(a bare model, a PEFT model, a LightningModule holding either)."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel


def outermost_hf_model(module: nn.Module) -> PreTrainedModel | None:
    """The first (outermost) transformers ``PreTrainedModel`` inside ``module``, or None."""
    return next((m for m in module.modules() if isinstance(m, PreTrainedModel)), None)


def find_hf_model(module: nn.Module) -> PreTrainedModel:
    """:func:`outermost_hf_model`, raising ``TypeError`` when there is none."""
    model = outermost_hf_model(module)
    if model is None:
        raise TypeError(f"no transformers PreTrainedModel found inside {type(module).__name__}")
    return model


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a ``PeftModel`` (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
