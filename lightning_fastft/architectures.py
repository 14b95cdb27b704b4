"""What differs between the supported decoder architectures, as one small table that patching
and GGUF export both read.

The architectures share one attention/MLP/causal-LM forward; an ``ArchitectureSpec`` holds
only where they disagree (read from the installed ``transformers`` modeling files and llama.cpp's
converter):

* RMSNorm: Llama-style ``weight * norm(x).to(dtype)`` with ``variance_epsilon``, or Gemma-style
  ``(norm(x) * (1 + weight)).to(dtype)`` with ``eps`` (gpt-oss: ``(norm(x) * weight).to(dtype)``,
  Gemma's casting without the offset).
* the config attribute naming the MLP activation (``hidden_act``; Gemma2: ``hidden_activation``).
* the extra keyword arguments the attention forward hands to the attention function
  (``sliding_window``, Gemma2's ``softcap``, gpt-oss's per-head attention sinks ``s_aux``), read
  from the attention module as HF does. The attention function itself is always Hugging Face's
  (or our varlen one for packed batches), so sinks are applied exactly as HF applies them.
* RoPE tables: HF's usual cos/sin repeat each angle over both halves of the head, which the RoPE
  kernel reads; gpt-oss's hold each angle once, so gpt-oss keeps its own ``apply_rotary_pos_emb``.
* the config attribute holding the final-logit softcap (Gemma2).
* mixture of experts (:class:`MoeSpec`): the sparse block (``<Prefix>SparseMoeBlock``; gpt-oss:
  ``GptOssMLP``) routes each token with its ``<Prefix>TopKRouter`` (attribute ``gate``; gpt-oss:
  ``router``) to ``<Prefix>Experts`` (stacked ``gate_up_proj`` / ``down_proj``), plus Qwen2-MoE's
  sigmoid-gated shared expert. gpt-oss's experts are laid out differently (``"interleaved"``:
  (E, in, out) weights with biases, gate/up columns interleaved, its clamped SwiGLU) and its block
  also returns the routing weights.
* GGUF: llama.cpp's architecture name (None: no GGUF export), whether q/k rows are re-paired for llama.cpp's interleaved
  RoPE (Llama, Mistral), whether the LM head is always the tied embedding (Gemma).
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


def _layer_sliding_window_and_sinks(attention: nn.Module) -> dict:
    return {"sliding_window": attention.sliding_window, "s_aux": attention.sinks}


@dataclass(frozen=True)
class MoeSpec:
    """How an architecture's sparse mixture-of-experts block is built (Hugging Face's names)."""

    block_suffix: str = "SparseMoeBlock"  # the block's class: <Prefix><block_suffix>
    router_attribute: str = "gate"  # the block's <Prefix>TopKRouter submodule
    expert_layout: str = "concatenated"
    """``"concatenated"``: (E, out, in) weights, no biases, the gate rows of ``gate_up_proj`` before
    the up rows, gated by the config's activation; ``"interleaved"`` (gpt-oss): (E, in, out)
    weights with ``gate_up_proj_bias``/``down_proj_bias``, gate and up columns alternating, gated
    by the experts' clamped SwiGLU (their ``alpha`` and ``limit``)."""
    returns_router_scores: bool = False  # forward returns (output, routing weights)


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
    rope_angles_once: bool = False  # cos/sin hold each angle once (gpt-oss), not HF's usual duplicated halves
    moe: MoeSpec | None = None  # the MLP of (some) layers is a sparse mixture-of-experts block
    gguf_arch: str | None = "LLAMA"  # the ``gguf.MODEL_ARCH`` member llama.cpp loads it as
    gguf_permute_qk: bool = False  # HF rotate-half q/k rows -> llama.cpp interleaved pairs
    tied_lm_head: bool = False  # the LM head is always the embedding (never written to GGUF)
    mlp_output_to_residual: bool = True
    """The decoder layer adds the (dense or sparse) MLP's output straight to the residual, so a
    checkpointed layer's recompute may skip computing it (Gemma2 normalises it first)."""

    @property
    def norm_class(self) -> str:
        return f"{self.class_prefix}RMSNorm"

    @property
    def attention_class(self) -> str:
        return f"{self.class_prefix}Attention"

    @property
    def mlp_class(self) -> str:
        return f"{self.class_prefix}MLP"

    @property
    def moe_block_class(self) -> str | None:
        return f"{self.class_prefix}{self.moe.block_suffix}" if self.moe else None

    @property
    def router_class(self) -> str:
        return f"{self.class_prefix}TopKRouter"

    @property
    def experts_class(self) -> str:
        return f"{self.class_prefix}Experts"


_GEMMA = {"norm_eps_attribute": "eps", "norm_offset": 1.0, "norm_casting": "gemma", "tied_lm_head": True}

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": ArchitectureSpec("Llama", gguf_permute_qk=True),
    "mistral": ArchitectureSpec("Mistral", attention_kwargs=_config_sliding_window, gguf_permute_qk=True),
    "qwen2": ArchitectureSpec("Qwen2", attention_kwargs=_layer_sliding_window, gguf_arch="QWEN2"),
    "qwen3": ArchitectureSpec("Qwen3", attention_kwargs=_layer_sliding_window, gguf_arch="QWEN3"),
    "gemma": ArchitectureSpec("Gemma", **_GEMMA, gguf_arch="GEMMA"),
    "gemma2": ArchitectureSpec(
        "Gemma2",
        **_GEMMA,
        gguf_arch="GEMMA2",
        activation_attribute="hidden_activation",
        attention_kwargs=_layer_sliding_window_and_softcap,
        final_softcap_attribute="final_logit_softcapping",
        mlp_output_to_residual=False,
    ),
    "qwen3_moe": ArchitectureSpec("Qwen3Moe", attention_kwargs=_layer_sliding_window, moe=MoeSpec(), gguf_arch=None),
    "qwen2_moe": ArchitectureSpec("Qwen2Moe", moe=MoeSpec(), gguf_arch=None),
    "mixtral": ArchitectureSpec("Mixtral", attention_kwargs=_config_sliding_window, moe=MoeSpec(), gguf_arch=None),
    "gpt_oss": ArchitectureSpec(
        "GptOss",
        norm_casting="gemma",
        attention_kwargs=_layer_sliding_window_and_sinks,
        rope_angles_once=True,
        moe=MoeSpec(
            block_suffix="MLP", router_attribute="router", expert_layout="interleaved", returns_router_scores=True
        ),
        gguf_arch=None,
    ),
}
"""Supported ``config.model_type`` values. Qwen3's q_norm/k_norm are RMSNorm modules of the same
class, found by the attention forward as ``q_norm``/``k_norm`` attributes. gpt-oss: every layer's
MLP is its sparse block (``GptOssMLP``, no dense MLP); attention runs Hugging Face's attention
function with the sinks and HF's RoPE (fused LoRA projections where adapters are attached)."""


def head_dim(config) -> int:
    """Per-head width: ``config.head_dim`` where set, else hidden size / attention heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
