"""Finding and unwrapping the Hugging Face models inside the modules users hand us
(a bare model, a PEFT model, a LightningModule holding either), and what Hugging Face's output
recording collects in the forward running now."""

from __future__ import annotations

import contextlib

from torch import nn
from transformers import PreTrainedModel
from transformers.utils.output_capturing import _active_collector  # private; in 5.17 .. 5.24


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


def hf_recorded_outputs() -> tuple[str, ...]:
    """What Hugging Face's output-recording forward hooks collect in the model forward running now
    (``"router_logits"`` with ``output_router_logits``, ``"attentions"``, ``"hidden_states"``...)."""
    collected = _active_collector.get()
    return tuple(key for key in collected or () if not key.startswith("_"))


def hf_record(key: str, tensors: list) -> None:
    """Add ``tensors`` to what Hugging Face's output recording collects under ``key`` in the forward
    running now, if it collects ``key`` (for module calls whose hooks did not run: a CUDA graph replay)."""
    collected = _active_collector.get()
    if collected is not None and key in collected:
        collected[key].extend(tensors)


@contextlib.contextmanager
def hf_output_recording_paused():
    """Hugging Face's output-recording hooks collect nothing inside (layers run outside the model's
    own forward, e.g. to capture them, must not add to the forward's recorded outputs)."""
    token = _active_collector.set(None)
    try:
        yield
    finally:
        _active_collector.reset(token)
