"""The tiny random-weight Hugging Face models the tests build, in one place (``from tiny_models import ...``;
pytest puts ``tests/`` on sys.path, as for ``helpers.py``).

Every test file used to carry its own builder. They differ in sizes, vocabularies and initialisation
on purpose (or at least their tolerances were tuned on them), so each keeps its own *named variant*
here, built exactly as before (same config values, same construction path, same random draws):

============  ==============================================  ======  ==========================
variant       shape (hidden / intermediate / layers / heads)  vocab   used by
============  ==============================================  ======  ==========================
patching      64 / 88 / 2 / 4 q + 2 kv of 16, init 0.15,      101     test_patching,
              noisy norm weights, small windows + softcaps            test_generation
convergence   64 / 96 / 2 / 4 q + 2 kv (config dicts for      128     test_convergence
              ``CausalLMFineTune(model=...)``, LoRA rank)
packing       32 / 48 / 2 / 4 q + 2 kv of 8, init 0.2,        97      test_packing
              5-token windows
checkpointing 36 / 70 / 3 / 3 q + 1 kv, eager, dropout 0.1    101     test_checkpointing
              (Llama and GPT-2)
export        64 / 128 / 2 / 4 q + 2 kv, rope theta 5e4       301     test_export
              (Llama; Qwen3 and Gemma2 GGUF variants)
lora          72 / 177 / 2 / 6 q + 2 kv of 12, PEFT r=8       61      test_lora
moe           36 / experts 19-23 / 2-3 / 3 q + 1 kv of 12,    97      test_moe,
              top-2 of 5-7 experts (Qwen3-MoE, Qwen2-MoE,             test_moe_gpt_oss
              Mixtral, gpt-oss with its clamp at work)
============  ==============================================  ======  ==========================

``ARCHITECTURES`` lists the model types the patches support, in the order tests parametrize over.
Importing this module imports transformers (and so triton): import it from test modules only, after
``conftest.py`` has set TRITON_INTERPRET.
"""

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# The decoder architectures lightning_fastft patches (model_type names).
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
# Every linear projection of a decoder layer (LoRA targets).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# ---------------------------------------------------------------- patching (patched vs HF)

PATCHING_VOCAB = 101
PATCHING_FIELDS = dict(
    hidden_size=64,
    intermediate_size=88,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=PATCHING_VOCAB,
    max_position_embeddings=64,
    initializer_range=0.15,
)
# Small windows and softcaps so sliding-window attention and both softcaps change the result.
PATCHING_OVERRIDES = {
    "mistral": {"sliding_window": 4},
    "qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    "gemma2": {
        "sliding_window": 4,
        "query_pre_attn_scalar": 16,
        "final_logit_softcapping": 2.0,
        "attn_logit_softcapping": 3.0,
    },
}


def patching_lm(model_type: str, attn_implementation: str = "sdpa") -> nn.Module:
    """Random-weight fp32 model: hidden 64, 2 layers, 4 heads / 2 KV heads of 16, vocab 101.

    Norm weights get noise (ones, or zeros for Gemma, plus N(0, 0.2)) so a mixed-up norm shows.
    """
    config = AutoConfig.for_model(model_type, **PATCHING_FIELDS, **PATCHING_OVERRIDES.get(model_type, {}))
    if model_type == "gemma2" and attn_implementation == "sdpa":
        attn_implementation = "eager"  # HF has no SDPA path with attention softcapping
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:  # norm weights: ones (or zeros for Gemma) plus noise
                parameter.add_(torch.randn_like(parameter) * 0.2)
    return model


def random_lora_b(model: nn.Module, std: float) -> nn.Module:
    """Every ``lora_B`` drawn from N(0, std) in place, as after training (PEFT starts them at zero, so
    ``lora_A`` would get no gradient at the first step)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, std)
    return model


def patching_lora(model: nn.Module) -> nn.Module:
    """PEFT LoRA (r 4, alpha 8, no dropout) on every projection, lora_B drawn from N(0, 0.2) as after training."""
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(PROJECTIONS))
    )
    return random_lora_b(peft_model, 0.2)


def patching_gpt2() -> nn.Module:
    """An architecture without a patching spec: GPT-2, hidden 32, 1 layer, 2 heads, vocab 101."""
    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=PATCHING_VOCAB, n_positions=32)
    return AutoModelForCausalLM.from_config(config)


# ---------------------------------------------------------------- convergence (Trainer runs)

CONVERGENCE_VOCAB = 128
CONVERGENCE_FIELDS = dict(
    vocab_size=CONVERGENCE_VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
# arch: (config fields for ``CausalLMFineTune(model=...)``, LoRA rank: 0 = full fine-tuning)
CONVERGENCE = {
    "llama": (dict(model_type="llama", **CONVERGENCE_FIELDS), 4),
    "mistral": (dict(model_type="mistral", sliding_window=None, **CONVERGENCE_FIELDS), 0),
    "qwen2": (dict(model_type="qwen2", **CONVERGENCE_FIELDS), 0),
    "qwen3": (dict(model_type="qwen3", head_dim=16, **CONVERGENCE_FIELDS), 4),
    "gemma": (dict(model_type="gemma", head_dim=16, hidden_act="gelu_pytorch_tanh", **CONVERGENCE_FIELDS), 0),
    "gemma2": (
        dict(model_type="gemma2", head_dim=16, query_pre_attn_scalar=16, sliding_window=8, **CONVERGENCE_FIELDS),
        4,
    ),
}

# ---------------------------------------------------------------- packing (varlen attention)

PACKING_VOCAB = 97
PACKING_FIELDS = dict(
    vocab_size=PACKING_VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    initializer_range=0.2,
)
# arch: (model class, config class, extra config fields); Mistral/Qwen2/Qwen3/Gemma2 slide a
# 5-token window on some layers.
PACKING = {
    "llama": (LlamaForCausalLM, LlamaConfig, {}),
    "mistral": (MistralForCausalLM, MistralConfig, dict(sliding_window=5)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "gemma": (GemmaForCausalLM, GemmaConfig, {}),
    # eager: HF's sdpa silently drops Gemma2's attention softcap (transformers 5.17 picks sdpa by default)
    "gemma2": (Gemma2ForCausalLM, Gemma2Config, dict(sliding_window=5, attn_logit_softcapping=1.5, _attn_implementation="eager")),
}  # fmt: skip


def packing_lm(arch: str, **overrides) -> nn.Module:
    """A tiny random-weight model of the packing variant; ``overrides`` replace config fields."""
    model_class, config_class, extra = PACKING[arch]
    return model_class(config_class(**{**PACKING_FIELDS, **extra, **overrides}))


def packing_llama_config() -> LlamaConfig:
    """The packing variant's Llama config (for tests that build several models from one config)."""
    return LlamaConfig(**PACKING_FIELDS)


def packing_gpt2() -> nn.Module:
    """An architecture without a varlen route: GPT-2, hidden 32, 1 layer, 4 heads, vocab 97."""
    config = GPT2Config(vocab_size=PACKING_VOCAB, n_embd=32, n_layer=1, n_head=4, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config)


# ---------------------------------------------------------------- checkpointing (recompute / offload)

CHECKPOINTING_VOCAB = 101
CHECKPOINTING_HIDDEN = 36


def checkpointing_llama(dropout: float = 0.1, layers: int = 3) -> nn.Module:
    """Eager-attention Llama with attention dropout (recompute must replay the masks); untied head."""
    config = LlamaConfig(
        vocab_size=CHECKPOINTING_VOCAB,
        hidden_size=CHECKPOINTING_HIDDEN,
        intermediate_size=70,
        num_hidden_layers=layers,
        num_attention_heads=3,
        num_key_value_heads=1,
        max_position_embeddings=64,
        attention_dropout=dropout,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config)


def checkpointing_gpt2(dropout: float = 0.1, layers: int = 3) -> nn.Module:
    """Eager-attention GPT-2 (an unpatched architecture) with residual, embedding and attention dropout."""
    config = GPT2Config(
        vocab_size=CHECKPOINTING_VOCAB,
        n_embd=CHECKPOINTING_HIDDEN,
        n_layer=layers,
        n_head=3,
        n_positions=64,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config)


def checkpointing_lora(model: nn.Module) -> nn.Module:
    """PEFT LoRA (r 4, alpha 8, dropout 0.1) on all linears, lora_B random too: every LoRA matrix gets a grad."""
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config)


# ---------------------------------------------------------------- export (merged 16-bit, GGUF)

EXPORT_VOCAB = 301
EXPORT_LLAMA_FIELDS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=EXPORT_VOCAB,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
)


def export_llama(**overrides) -> LlamaForCausalLM:
    """Llama in eval mode; ``overrides`` replace config fields."""
    return LlamaForCausalLM(LlamaConfig(**{**EXPORT_LLAMA_FIELDS, **overrides})).eval()


def export_qwen3() -> Qwen3ForCausalLM:
    """Qwen3 with attention biases, tied embeddings, 1 layer, intermediate 80 (not a Q8_0 block multiple)."""
    config = Qwen3Config(
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=97,
        max_position_embeddings=128,
        attention_bias=True,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(config).eval()


def export_gemma2() -> Gemma2ForCausalLM:
    """Gemma2 with its default softcaps and a 32-token window."""
    config = Gemma2Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=89,
        max_position_embeddings=128,
        sliding_window=32,
    )
    return Gemma2ForCausalLM(config).eval()


# model_type -> extra config fields of the llama.cpp check models (export_lm)
EXPORT_LM_OVERRIDES = {
    "mistral": {"sliding_window": None},
    "gemma": {"hidden_act": "gelu_pytorch_tanh"},
    "gemma2": {"query_pre_attn_scalar": 16, "sliding_window": 32, "attn_implementation": "eager"},
}


def export_lm(model_type: str, vocab_size: int, seed: int = 0, **overrides) -> nn.Module:
    """A model of any exported family for the llama.cpp checks: hidden 64, 2 layers, 4 q + 2 kv heads of 16,
    weights drawn with std 0.1 from ``seed`` (spread-out logits, so greedy tokens are not near-ties);
    ``overrides`` replace config fields."""
    fields = {**EXPORT_LLAMA_FIELDS, "vocab_size": vocab_size, "head_dim": 16, "initializer_range": 0.1, **overrides}
    fields.pop("rope_parameters")
    extra = dict(EXPORT_LM_OVERRIDES.get(model_type, {}))
    attn = extra.pop("attn_implementation", "sdpa")
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**fields, **extra})
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


# ---------------------------------------------------------------- lora (fused LoRA kernels)

LORA_HIDDEN, LORA_INTERMEDIATE, LORA_VOCAB = 72, 177, 61  # 6 heads of 12, 2 KV heads: k/v out 24; odd intermediate


def lora_llama(device, dtype=torch.float32, target_modules="all-linear", layers=2, **lora_kwargs):
    """PEFT LoRA (r 8, alpha 16, random lora_B) Llama on ``device`` in ``dtype``; returns (model, its layer 1)."""
    config = LlamaConfig(
        hidden_size=LORA_HIDDEN, intermediate_size=LORA_INTERMEDIATE, num_hidden_layers=layers,
        num_attention_heads=6, num_key_value_heads=2, vocab_size=LORA_VOCAB,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    lora_config = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=target_modules,
                       init_lora_weights=False)  # random lora_B: gradients are meaningful  # fmt: skip
    lora_config.update(lora_kwargs)
    model = get_peft_model(model, LoraConfig(**lora_config)).to(device=device, dtype=dtype)
    return model, model.base_model.model.model.layers[1]


# ---------------------------------------------------------------- moe (mixture-of-experts patching)

MOE_VOCAB = 97  # PACKING_VOCAB: the packing helpers' samples fit
MOE_FIELDS = dict(
    hidden_size=36,
    num_hidden_layers=2,
    num_attention_heads=3,
    num_key_value_heads=1,
    head_dim=12,
    vocab_size=MOE_VOCAB,
    max_position_embeddings=64,
    initializer_range=0.2,
    num_experts_per_tok=2,
    output_router_logits=True,  # the load-balancing loss is part of the training loss
    router_aux_loss_coef=0.05,
    # HF's own per-expert loop as the reference: its default "grouped_mm" needs 16-byte aligned
    # strides, which these odd widths in fp32 do not have (torch's CPU grouped_mm raises)
    experts_implementation="eager",
)
# model_type: its own fields (odd expert widths; Qwen3-MoE with a dense layer; Qwen2-MoE without
# top-k renormalisation and with its shared expert; Mixtral with 5 experts; gpt-oss with 6 experts,
# a 4-token window on layer 0 (sliding, full, as its default layer_types alternate), attention
# sinks and YaRN RoPE)
MOE = {
    "qwen3_moe": dict(
        num_experts=7, moe_intermediate_size=19, intermediate_size=50, norm_topk_prob=True, mlp_only_layers=[1],
    ),
    "qwen2_moe": dict(
        num_experts=6, moe_intermediate_size=21, intermediate_size=50, shared_expert_intermediate_size=27,
        norm_topk_prob=False,
    ),
    "mixtral": dict(num_local_experts=5, intermediate_size=23),
    "gpt_oss": dict(
        num_local_experts=6, intermediate_size=19, sliding_window=4,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16},
    ),
}  # fmt: skip
GPT_OSS_GATE_UP_SCALE = 4.0
"""``moe_lm("gpt_oss")`` scales its experts' ``gate_up_proj`` by this (std 0.8 over 36 inputs: gate
and up values of std about 5), so that many of them pass gpt-oss's clamp limit 7 and the clamped
branches of its SwiGLU are at work; its expert biases are drawn from N(0, 0.5) (HF starts them at 0)."""


def moe_config(model_type: str, **overrides) -> dict:
    """Config fields (with ``model_type``) of the tiny mixture-of-experts model, as
    ``CausalLMFineTune(model=...)`` takes them."""
    return {"model_type": model_type, **MOE_FIELDS, **MOE[model_type], **overrides}


def moe_lm(model_type: str, **overrides) -> nn.Module:
    """Random-weight fp32 MoE causal LM: hidden 36, 3 heads / 1 KV head of 12, top-2 of 5-7 experts
    (gpt-oss: see :data:`GPT_OSS_GATE_UP_SCALE`)."""
    fields = moe_config(model_type, **overrides)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = AutoModelForCausalLM.from_config(config)
    if model_type == "gpt_oss":
        with torch.no_grad():
            for layer in model.model.layers:
                experts = layer.mlp.experts
                experts.gate_up_proj.mul_(GPT_OSS_GATE_UP_SCALE)
                experts.gate_up_proj_bias.normal_(0.0, 0.5)
                experts.down_proj_bias.normal_(0.0, 0.5)
    return model
