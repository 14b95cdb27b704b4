"""QLoRA set-up on tiny random-weight models: 4-bit base, frozen, LoRA the only trainable part."""

import copy

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from helpers import eval_logits, relative_error
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lightning_fastft.bnb import quantize_linear_layers
from lightning_fastft.qlora import load_qlora, prepare_qlora

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(device, intermediate_size=192) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=211,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).to(device).eval()


def test_quantize_linear_layers_matches_dequantised_reference(device):
    model = tiny_llama(device)
    original = copy.deepcopy(model)
    input_ids = torch.randint(0, 211, (2, 13), device=device)

    names = quantize_linear_layers(model, compute_dtype=torch.float32)

    assert len(names) == 2 * len(LINEAR_NAMES) and not any("lm_head" in n for n in names)
    assert type(model.lm_head) is nn.Linear
    reference = copy.deepcopy(original)  # original weights replaced by their NF4 round trip
    weight_errors = []
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.bnb_quantized
        assert layer.weight.dtype == torch.uint8 and layer.weight.quant_state.quant_type == "nf4"
        assert layer.weight.quant_state.nested  # double quantisation of the absmax
        dense = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        source = original.get_submodule(name).weight
        weight_errors.append(relative_error(dense, source))
        reference.get_submodule(name).weight.data.copy_(dense)

    model.train()  # keeps bitsandbytes' CPU inference repacking out of this comparison
    quantized_logits = eval_logits(model, input_ids)
    # the 4-bit model computes exactly what its dequantised weights give ...
    assert relative_error(quantized_logits, eval_logits(reference, input_ids)) < 1e-4
    # ... and those sit at NF4's error level: ~10% per weight for Gaussian weights
    assert all(0.03 < e < 0.15 for e in weight_errors), " ".join(f"{e:.3f}" for e in weight_errors)
    assert 1e-3 < relative_error(quantized_logits, eval_logits(original, input_ids)) < 0.3


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only bitsandbytes limitation")
def test_cpu_leaves_layers_with_misaligned_rows_unquantised():
    model = tiny_llama("cpu", intermediate_size=160)  # down_proj rows of 160: not whole 64-blocks
    with pytest.warns(UserWarning, match="unquantised on CPU"):
        names = quantize_linear_layers(model, compute_dtype=torch.float32)
    assert not any(n.endswith("down_proj") for n in names)
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)


def test_prepare_qlora_trains_only_lora(device):
    model = prepare_qlora(tiny_llama(device), lora_r=8, lora_alpha=16)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * len(LINEAR_NAMES)  # A and B per linear layer per block
    # the rest of the model is in compute dtype (bf16); the quantised weights are packed uint8
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.dtype in (torch.bfloat16, torch.uint8), name

    model.train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    input_ids = torch.randint(0, 211, (2, 9), device=device)
    for _ in range(2):  # lora_B starts at zero, so lora_A only gets a gradient on the second step
        loss = model(input_ids, labels=input_ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if ".lora_A." in k or ".lora_B." in k}


def test_prepare_qlora_skip_modules_and_fp4(device):
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=64,
    )
    model = Qwen2ForCausalLM(config).to(device)
    peft_model = prepare_qlora(
        model,
        quant_type="fp4",
        double_quant=False,
        skip_modules=("lm_head", "down_proj"),
        target_modules=["q_proj", "v_proj"],
    )
    layer = model.model.layers[0]
    assert type(layer.mlp.down_proj) is nn.Linear
    assert layer.self_attn.q_proj.base_layer.weight.quant_state.quant_type == "fp4"
    assert not layer.self_attn.q_proj.base_layer.weight.quant_state.nested
    assert isinstance(layer.self_attn.k_proj, bnb.nn.Linear4bit)  # quantised, no adapter
    assert layer.self_attn.q_proj.base_layer.bias.dtype == torch.bfloat16  # qwen2 q/k/v have biases
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("q_proj.lora" in n or "v_proj.lora" in n for n in trainable)


def test_load_qlora_from_local_directory(tmp_path, device):
    source = tiny_llama("cpu")
    source.save_pretrained(tmp_path)
    input_ids = torch.randint(0, 211, (1, 7), device=device)

    loaded = load_qlora(str(tmp_path), compute_dtype=torch.float32, lora_r=4, device_map=device, local_files_only=True)
    in_place = prepare_qlora(copy.deepcopy(source).to(device), compute_dtype=torch.float32, lora_r=4)

    base = loaded.get_base_model()
    assert isinstance(base.model.layers[1].mlp.up_proj.base_layer, bnb.nn.Linear4bit)
    assert type(base.lm_head) is nn.Linear
    assert all(".lora_" in n for n, p in loaded.named_parameters() if p.requires_grad)
    loaded.train()
    in_place.train()
    # transformers' quantiser and prepare_qlora quantise the same weights the same way
    assert relative_error(eval_logits(loaded, input_ids), eval_logits(in_place, input_ids)) < 1e-4
