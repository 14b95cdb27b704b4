"""Merged 16-bit export and GGUF export of tiny random-weight models (no downloads)."""

import numpy as np
import pytest
import torch

import gguf
from helpers import eval_logits, relative_error
from tiny_models import EXPORT_VOCAB, export_gemma2, export_llama, export_qwen3
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedTokenizerFast

from lightning_fastft.export import export_gguf, merge_and_save, permute_rotary_halves
from lightning_fastft.qlora import attach_lora, prepare_qlora

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "lightning makes fine-tuning fast and lean",
    "quantised weights keep memory small, adapters keep quality",
    "gguf files run on llama.cpp",
]


def randomize_norms(model):
    """Random norm weights, so a norm shift or a mix-up of norms shows in the read-back."""
    for name, param in model.named_parameters():
        if "norm" in name:
            param.data.uniform_(0.5, 1.5)
    return model


def randomize_lora_b(peft_model):
    """Random lora_B values, as after training (PEFT starts them at zero, which would hide the adapter)."""
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.05)
    return peft_model


def tiny_bpe_tokenizer(vocab_size=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


# ---------------------------------------------------------------- merged 16-bit export


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_merge_and_save_lora_round_trip(tmp_path, dtype, tol):
    model = randomize_lora_b(attach_lora(export_llama(), lora_r=4, lora_alpha=8))
    input_ids = torch.randint(0, EXPORT_VOCAB, (2, 11))
    peft_logits = eval_logits(model, input_ids)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}

    merged = merge_and_save(model, tmp_path, dtype=dtype, tokenizer=tiny_bpe_tokenizer())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)

    assert loaded.dtype == dtype and type(loaded) is LlamaForCausalLM
    assert not any("lora" in k for k in loaded.state_dict())
    torch.testing.assert_close(eval_logits(loaded, input_ids), eval_logits(merged, input_ids), rtol=0, atol=0)
    assert relative_error(eval_logits(loaded, input_ids), peft_logits) < tol
    assert (tmp_path / "tokenizer.json").exists()
    # The caller's training model is untouched: same tensors, adapters still unmerged.
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state_before[key], rtol=0, atol=0)
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_merge_and_save_qlora_is_dequantised_base_plus_lora(tmp_path, device):
    model = prepare_qlora(export_llama().to(device), compute_dtype=torch.float32, lora_r=4, lora_alpha=8)
    randomize_lora_b(model)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    qweight_before = q_proj.base_layer.weight.data.clone()
    input_ids = torch.randint(0, EXPORT_VOCAB, (2, 11), device=device)
    model.train()  # the 4-bit forward in train mode, so CPU does not repack the weights
    peft_logits = eval_logits(model, input_ids)

    merge_and_save(model, tmp_path, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).to(device)

    import bitsandbytes.functional as bnbf

    lora_delta = (q_proj.lora_B["default"].weight @ q_proj.lora_A["default"].weight) * q_proj.scaling["default"]
    expected = bnbf.dequantize_4bit(q_proj.base_layer.weight.data, q_proj.base_layer.weight.quant_state) + lora_delta
    torch.testing.assert_close(loaded.model.layers[0].self_attn.q_proj.weight, expected.detach(), rtol=1e-5, atol=1e-6)
    assert relative_error(eval_logits(loaded, input_ids), peft_logits) < 1e-4
    torch.testing.assert_close(q_proj.base_layer.weight.data, qweight_before, rtol=0, atol=0)


def test_merge_and_save_to_a_file_raises_and_keeps_it(tmp_path):
    """save_pretrained only logs an error for a file path and saves nothing."""
    target = tmp_path / "model.bin"
    target.write_text("user data")
    with pytest.raises(NotADirectoryError, match="model.bin.*is a file"):
        merge_and_save(export_llama(), target)
    assert target.read_text() == "user data"


@pytest.mark.skipif(torch.cuda.is_available(), reason="bitsandbytes repacks 4-bit weights only on CPU")
def test_merge_after_cpu_inference_repacking_leaves_model_alone(tmp_path):
    model = prepare_qlora(export_llama(), compute_dtype=torch.bfloat16, lora_r=4)
    q_proj = model.base_model.model.model.layers[1].self_attn.q_proj.base_layer
    import bitsandbytes.functional as bnbf

    dense_before = bnbf.dequantize_4bit(q_proj.weight.data, q_proj.weight.quant_state).float()
    model.eval()
    eval_logits(model, torch.randint(0, EXPORT_VOCAB, (1, 5)))  # eval + no_grad: AVX512-BF16 CPUs repack in place
    if not getattr(q_proj.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16 repacking")
    packed_before = q_proj.weight.data.clone()

    merged = merge_and_save(model, tmp_path, dtype=torch.float32)

    merged_q = merged.model.layers[1].self_attn.q_proj.weight  # LoRA B is zero: merged == base
    assert relative_error(merged_q, dense_before) < 1e-2  # bf16 absmax of the repacked layout
    assert q_proj.weight.quant_state.packing_format_for_cpu
    torch.testing.assert_close(q_proj.weight.data, packed_before, rtol=0, atol=0)


# ---------------------------------------------------------------- GGUF export


def unpermute_rotary_halves(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row order: interleaved pairs back to rotate-half halves."""
    head_dim = weight.shape[0] // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_tensors(path):
    reader = gguf.GGUFReader(path)
    tensors = {}
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists dims innermost first
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        tensors[tensor.name] = (tensor.tensor_type, values)
    return reader, tensors


def field(reader, key):
    value = reader.get_field(key)
    assert value is not None, f"missing {key}"
    return value.contents()


LLAMA_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


def expand_names(table, n_layers):
    out = {}
    for hf, gg in table.items():
        for i in range(n_layers) if "{i}" in hf else [None]:
            out[hf.format(i=i)] = gg.format(i=i)
    return out


@pytest.mark.parametrize(
    "dtype, qtype, rtol",
    [
        ("f16", gguf.GGMLQuantizationType.F16, 1e-3),
        ("bf16", gguf.GGMLQuantizationType.BF16, 8e-3),
        ("q8_0", gguf.GGMLQuantizationType.Q8_0, 1e-2),
    ],
)
def test_export_gguf_llama_tensors_and_metadata(tmp_path, dtype, qtype, rtol):
    model = randomize_norms(export_llama())
    tokenizer = tiny_bpe_tokenizer()
    path = export_gguf(model, tmp_path / f"tiny-{dtype}.gguf", dtype=dtype, tokenizer=tokenizer)
    reader, tensors = read_tensors(path)
    names = expand_names(LLAMA_NAMES, 2)
    config = model.config

    assert set(tensors) == set(names.values())
    for hf_name, gguf_name in names.items():
        source = model.state_dict()[hf_name].float().numpy()
        if hf_name.endswith("q_proj.weight"):
            source = permute_rotary_halves(torch.from_numpy(source), 4).numpy()
        if hf_name.endswith("k_proj.weight"):
            source = permute_rotary_halves(torch.from_numpy(source), 2).numpy()
        stored_type, values = tensors[gguf_name]
        assert values.shape == source.shape, gguf_name
        if source.ndim == 1:
            assert stored_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(values, source)
            continue
        assert stored_type == qtype, gguf_name
        if dtype == "f16":
            np.testing.assert_array_equal(values, source.astype(np.float16).astype(np.float32))
        else:
            assert np.linalg.norm(values - source) / np.linalg.norm(source) < rtol, gguf_name
            np.testing.assert_allclose(values, source, rtol=0, atol=rtol * np.abs(source).max() * 2)

    assert field(reader, "general.architecture") == "llama"
    expected_metadata = {
        "llama.context_length": 256,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "llama.vocab_size": 301,
        "general.file_type": {"f16": 1, "bf16": 32, "q8_0": 7}[dtype],
    }
    for key, value in expected_metadata.items():
        assert field(reader, key) == value, key
    assert field(reader, "llama.rope.freq_base") == pytest.approx(50000.0)
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)

    # tokenizer: byte-level BPE -> llama.cpp "gpt2" model, padded to the model's vocab size
    vocab = tokenizer.get_vocab()
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert len(tokens) == 301 and len(vocab) == 300
    assert all(tokens[i] == t for t, i in vocab.items())
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[vocab["<s>"]] == gguf.TokenType.CONTROL and types[300] == gguf.TokenType.UNUSED
    assert len(field(reader, "tokenizer.ggml.scores")) == 301
    merges = field(reader, "tokenizer.ggml.merges")
    assert len(merges) > 0 and all(len(m.split(" ")) == 2 for m in merges)
    first_merged_token = "".join(merges[0].split(" "))
    assert types[vocab[first_merged_token]] == gguf.TokenType.NORMAL
    assert field(reader, "tokenizer.ggml.bos_token_id") == vocab["<s>"]
    assert field(reader, "tokenizer.ggml.eos_token_id") == vocab["</s>"]


def test_qk_permutation_is_invertible_and_interleaves_pairs():
    n_heads, head_dim = 3, 8
    weight = torch.randn(n_heads * head_dim, 5)
    permuted = permute_rotary_halves(weight, n_heads)
    np.testing.assert_array_equal(unpermute_rotary_halves(permuted.numpy(), n_heads), weight.numpy())
    # within each head, HF rows j and j + d/2 (a rotate-half pair) land next to each other
    for h in range(n_heads):
        for j in range(head_dim // 2):
            torch.testing.assert_close(permuted[h * head_dim + 2 * j], weight[h * head_dim + j])
            torch.testing.assert_close(permuted[h * head_dim + 2 * j + 1], weight[h * head_dim + head_dim // 2 + j])


def test_export_gguf_from_saved_qlora_merge_unpermutes_to_hf(tmp_path):
    """Directory input: merged QLoRA checkpoint -> GGUF; un-permuted q/k equal the HF weights."""
    model = prepare_qlora(export_llama(), compute_dtype=torch.float32, lora_r=4)
    merged = merge_and_save(model, tmp_path / "merged", dtype=torch.float32, tokenizer=tiny_bpe_tokenizer())
    path = export_gguf(tmp_path / "merged", tmp_path / "merged.gguf", dtype="f16")
    reader, tensors = read_tensors(path)
    for i in range(2):
        attn = merged.model.layers[i].self_attn
        for proj, n_heads in (("q", 4), ("k", 2)):
            stored = unpermute_rotary_halves(tensors[f"blk.{i}.attn_{proj}.weight"][1], n_heads)
            hf = getattr(attn, f"{proj}_proj").weight.detach().numpy()
            np.testing.assert_array_equal(stored, hf.astype(np.float16).astype(np.float32))
    assert field(reader, "tokenizer.ggml.model") == "gpt2"  # tokenizer picked up from the directory


def test_export_gguf_qwen3_no_permutation_q_norm_and_biases(tmp_path):
    model = randomize_norms(export_qwen3())
    # intermediate 80 is not a multiple of the Q8_0 block (32): down_proj falls back to F16, with a warning
    fallback = r"1 of 8 weight matrices stay F16.*: blk\.0\.ffn_down\.weight \(rows of 80\)$"
    with pytest.warns(UserWarning, match=fallback):
        reader, tensors = read_tensors(export_gguf(model, tmp_path / "qwen3.gguf", dtype="q8_0"))
    state = model.state_dict()
    assert field(reader, "general.architecture") == "qwen3"
    assert "output.weight" not in tensors  # tied to token_embd
    q_norm = state["model.layers.0.self_attn.q_norm.weight"].numpy()
    np.testing.assert_array_equal(tensors["blk.0.attn_q_norm.weight"][1], q_norm)
    k_bias = state["model.layers.0.self_attn.k_proj.bias"].numpy()
    np.testing.assert_array_equal(tensors["blk.0.attn_k.bias"][1], k_bias)
    q_stored, q_source = tensors["blk.0.attn_q.weight"][1], state["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert np.linalg.norm(q_stored - q_source) / np.linalg.norm(q_source) < 1e-2  # same row order
    assert tensors["blk.0.ffn_down.weight"][0] == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.ffn_up.weight"][0] == gguf.GGMLQuantizationType.Q8_0


def test_export_gguf_gemma2_norms_shifted_and_softcaps(tmp_path):
    model = randomize_norms(export_gemma2())
    config = model.config
    reader, tensors = read_tensors(export_gguf(model, tmp_path / "gemma2.gguf", dtype="f16"))
    state = model.state_dict()
    norms = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
    }
    for hf, gg in norms.items():
        source = state[f"model.layers.1.{hf}.weight"].numpy()
        np.testing.assert_allclose(tensors[f"blk.1.{gg}.weight"][1], source + 1, rtol=1e-6)
    np.testing.assert_allclose(tensors["output_norm.weight"][1], state["model.norm.weight"].numpy() + 1, rtol=1e-6)
    assert "output.weight" not in tensors
    q_stored, q_source = tensors["blk.0.attn_q.weight"][1], state["model.layers.0.self_attn.q_proj.weight"].numpy()
    np.testing.assert_array_equal(q_stored, q_source.astype(np.float16).astype(np.float32))  # not permuted
    assert field(reader, "gemma2.attn_logit_softcapping") == pytest.approx(config.attn_logit_softcapping)
    assert field(reader, "gemma2.final_logit_softcapping") == pytest.approx(config.final_logit_softcapping)
    assert field(reader, "gemma2.attention.sliding_window") == 32
    assert field(reader, "gemma2.attention.key_length") == 16


def test_export_gguf_llama3_rope_writes_rope_freqs(tmp_path):
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    model = export_llama()
    model.config.rope_parameters = rope
    _, tensors = read_tensors(export_gguf(model, tmp_path / "l3.gguf", dtype="f16"))
    factors = tensors["rope_freqs.weight"][1]
    # llama3 scaling: high frequencies untouched (1), low frequencies divided by `factor`, smooth between
    assert factors.shape == (8,)
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(8.0)
    assert np.all(np.diff(factors) >= -1e-6)


def test_export_gguf_rejects_unknown_dtype_and_arch(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        export_gguf(export_llama(), tmp_path / "x.gguf", dtype="q4_k")
    model = export_llama()
    model.config.model_type = "gpt2"
    with pytest.raises(NotImplementedError, match="model_type"):
        export_gguf(model, tmp_path / "x.gguf")


def test_export_gguf_keeps_an_existing_file_unless_overwrite(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"an earlier export")
    with pytest.raises(FileExistsError, match="model.gguf.*overwrite=True"):
        export_gguf(export_llama(), target)
    assert target.read_bytes() == b"an earlier export"
    with pytest.raises(IsADirectoryError, match="is a directory"):
        export_gguf(export_llama(), tmp_path, overwrite=True)

    export_gguf(export_llama(), target, overwrite=True)
    _, tensors = read_tensors(target)
    assert "token_embd.weight" in tensors


def test_export_gguf_q8_0_warns_which_matrices_stay_f16(tmp_path):
    """Hidden size 48 and intermediate 80: no row is a multiple of the 32-wide Q8_0 block."""
    model = export_llama(hidden_size=48, intermediate_size=80, num_hidden_layers=1)
    with pytest.warns(UserWarning, match="none of the 9 weight matrices is Q8_0") as caught:
        _, tensors = read_tensors(export_gguf(model, tmp_path / "q8.gguf", dtype="q8_0"))
    f16 = {name for name, (qtype, _) in tensors.items() if qtype == gguf.GGMLQuantizationType.F16}
    assert len(f16) == 9
    message = str(caught[0].message)
    assert all(name in message for name in f16)
    assert "blk.0.ffn_down.weight (rows of 80)" in message
