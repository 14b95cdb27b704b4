"""What differs between the supported decoder architectures, as one small table.

The six architectures share one attention/MLP/causal-LM forward; an ``ArchitectureSpec`` holds
only where they disagree (read from the installed ``transformers`` modeling files):

* RMSNorm: Llama-style ``weight * norm(x).to(dtype)`` with ``variance_epsilon``, or Gemma-style
  ``(norm(x) * (1 + weight)).to(dtype)`` with ``eps``.
* the config attribute naming the MLP activation (``hidden_act``; Gemma2: ``hidden_activation``).
* the extra keyword arguments the attention forward hands to the attention function
  (``sliding_window`` and Gemma2's ``softcap``), read from the attention module as HF does.
* the config attribute holding the final-logit softcap (Gemma2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


def _no_attention_kwargs(attention: nn.Module) -> dict:
    return {}


def _config_sliding_window(attention: nn.Module) -> dict:
    return {"sliding_window": getattr(attention.config, "sliding_window", None)}


def _layer_sliding_window(attention: nn.Module) -> dict:
    return {"sliding_window": attention.sliding_window}


def _layer_sliding_window_and_softcap(attention: nn.Module) -> dict:
    return {"sliding_window": attention.sliding_window, "softcap": attention.attn_logit_softcapping}


@dataclass(frozen=True)
class ArchitectureSpec:
    """How one architecture's modules are recognised and where it departs from Llama."""

    class_prefix: str  # "Llama" -> LlamaRMSNorm, LlamaAttention, LlamaMLP
    norm_eps_attribute: str = "variance_epsilon"
    norm_offset: float = 0.0  # Gemma scales by (1 + weight)
    norm_casting: str = "llama"  # "gemma": multiply by the weight in fp32, then cast
    activation_attribute: str = "hidden_act"
    attention_kwargs: Callable[[nn.Module], dict] = _no_attention_kwargs
    final_softcap_attribute: str | None = None

    @property
    def norm_class(self) -> str:
        return f"{self.class_prefix}RMSNorm"

    @property
    def attention_class(self) -> str:
        return f"{self.class_prefix}Attention"

    @property
    def mlp_class(self) -> str:
        return f"{self.class_prefix}MLP"


_GEMMA_NORM = {"norm_eps_attribute": "eps", "norm_offset": 1.0, "norm_casting": "gemma"}

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": ArchitectureSpec("Llama"),
    "mistral": ArchitectureSpec("Mistral", attention_kwargs=_config_sliding_window),
    "qwen2": ArchitectureSpec("Qwen2", attention_kwargs=_layer_sliding_window),
    "qwen3": ArchitectureSpec("Qwen3", attention_kwargs=_layer_sliding_window),
    "gemma": ArchitectureSpec("Gemma", **_GEMMA_NORM),
    "gemma2": ArchitectureSpec(
        "Gemma2",
        **_GEMMA_NORM,
        activation_attribute="hidden_activation",
        attention_kwargs=_layer_sliding_window_and_softcap,
        final_softcap_attribute="final_logit_softcapping",
    ),
}
"""Supported ``config.model_type`` values. Qwen3's q_norm/k_norm are RMSNorm modules of the same
class, found by the attention forward as ``q_norm``/``k_norm`` attributes."""
