"""GGUF pieces without llama.cpp: our k-quant blocks (read back with the gguf package's dequantisers),
llama.cpp's q4_k_m / q5_k_m / q6_k tensor-type mixture, tokenizer metadata per family, refusals of
what llama.cpp cannot run, and the Ollama Modelfile."""

from __future__ import annotations

import json
import warnings

import gguf
import numpy as np
import pytest
import torch
from tiny_models import export_lm
from tiny_tokenizers import family_tokenizer
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lightning_fastft.export import export_gguf
from lightning_fastft.export.modelfile import chat_pieces, modelfile_text
from lightning_fastft.export.quants import QK_K, mixture_type, quantize_k

Q = gguf.GGMLQuantizationType

# ---------------------------------------------------------------- k-quant blocks

# Relative RMS error bounds on Gaussian rows: a uniform quantiser over a sub-block's range has error
# about range / (levels * sqrt(12)); 32 Gaussian values span about 4 sigma (Q4_K/Q5_K: 15 / 31
# levels -> 0.077 / 0.037), 16 values of Q6_K about 3.5 sigma (63 levels -> 0.016). Measured:
# 0.074 / 0.037 / 0.018 (the 6-bit scales add a little). The bounds leave 15% on top.
BOUNDS = {Q.Q4_K: 0.085, Q.Q5_K: 0.043, Q.Q6_K: 0.021}
BLOCK_BYTES = {Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}


def dequantized(blocks: np.ndarray, qtype) -> np.ndarray:
    return gguf.quants.dequantize(blocks, qtype)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_kquant_blocks_decode_close_to_the_weights(qtype):
    torch.manual_seed(0)
    weight = torch.randn(37, 3 * QK_K) * 0.02  # odd row count, three super-blocks per row
    blocks = quantize_k(weight, qtype)
    assert blocks.dtype == np.uint8 and blocks.shape == (37, 3 * BLOCK_BYTES[qtype])
    back = dequantized(blocks, qtype)
    assert back.shape == weight.shape
    error = np.linalg.norm(back - weight.numpy()) / np.linalg.norm(weight.numpy())
    assert error < BOUNDS[qtype]
    # every sub-block's worst error is within one quantisation step of its range
    sub = 16 if qtype == Q.Q6_K else 32
    levels = {Q.Q4_K: 15, Q.Q5_K: 31, Q.Q6_K: 63}[qtype]
    x = weight.numpy().reshape(-1, sub)
    span = x.max(1) - np.minimum(x.min(1), 0) if qtype != Q.Q6_K else 2 * np.abs(x).max(1)
    assert np.all(np.abs(back.reshape(-1, sub) - x).max(1) <= span / levels * 1.01 + 1e-7)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_kquant_edge_blocks(qtype):
    """Zero rows stay zero; a constant row, a negative-only row, one outlier in a row, small (1e-3)
    and large (40) values decode within the type's error; no NaN anywhere. (Much smaller values
    lose precision in any k-quant: the super-block scales are fp16, subnormal below 6e-5.)"""
    torch.manual_seed(1)
    rows = torch.zeros(6, QK_K)
    rows[1] = 0.37
    rows[2] = -torch.rand(QK_K) - 0.1
    rows[3] = torch.randn(QK_K) * 0.01
    rows[3, 77] = 3.0  # an outlier: its sub-block's scale grows, the others are untouched
    rows[4] = torch.randn(QK_K) * 1e-3
    rows[5] = torch.randn(QK_K) * 40.0  # large values (fp16 super-scales)
    back = dequantized(quantize_k(rows, qtype), qtype)
    assert np.isfinite(back).all()
    np.testing.assert_array_equal(back[0], 0.0)
    for i in (1, 2, 4, 5):
        assert np.linalg.norm(back[i] - rows[i].numpy()) <= BOUNDS[qtype] * np.linalg.norm(rows[i].numpy()) * 1.5, i
    assert abs(back[3, 77] - 3.0) < 3.0 * BOUNDS[qtype]
    # sub-blocks away from the outlier keep a scale of their own (coarser in Q6_K, whose int8 sub-scales
    # share one fp16 maximum with the outlier's: 7% measured, 4% for Q4_K / Q5_K)
    far = np.r_[0:64, 128:256]
    assert np.linalg.norm(back[3, far] - rows[3, far].numpy()) < 0.1 * np.linalg.norm(rows[3, far].numpy())


def test_quantize_k_refuses_rows_not_a_multiple_of_256():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_k(torch.randn(4, 300), Q.Q4_K)
    with pytest.raises(ValueError, match="handles"):
        quantize_k(torch.randn(4, 256), Q.Q8_0)


# ---------------------------------------------------------------- llama.cpp's mixture


def test_q4_k_m_mixture_of_a_32_layer_model_is_llama_cpps():
    """Llama-3-8B in llama.cpp's Q4_K_M: attn_v and ffn_down in Q6_K on layers 0-3, 28-31 and every
    third from 6; the rest Q4_K; output in Q6_K."""
    more_bits = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
    for layer in range(32):
        for name in ("attn_v", "ffn_down"):
            expected = Q.Q6_K if layer in more_bits else Q.Q4_K
            assert mixture_type("q4_k_m", f"blk.{layer}.{name}.weight", 4096, layer, 32, tied=False) == expected
        for name in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert mixture_type("q4_k_m", f"blk.{layer}.{name}.weight", 4096, layer, 32, tied=False) == Q.Q4_K
        assert mixture_type("q5_k_m", f"blk.{layer}.attn_q.weight", 4096, layer, 32, tied=False) == Q.Q5_K
        assert mixture_type("q6_k", f"blk.{layer}.attn_v.weight", 4096, layer, 32, tied=False) == Q.Q6_K
    assert mixture_type("q4_k_m", "output.weight", 4096, None, 32, tied=False) == Q.Q6_K
    assert mixture_type("q4_k_m", "token_embd.weight", 4096, None, 32, tied=False) == Q.Q4_K
    assert mixture_type("q4_k_m", "token_embd.weight", 4096, None, 32, tied=True) == Q.Q6_K  # it is the output


def test_mixture_fallbacks_for_rows_not_a_multiple_of_256():
    assert mixture_type("q4_k_m", "blk.0.attn_q.weight", 128, 0, 8, tied=False) == Q.Q5_0
    assert mixture_type("q5_k_m", "blk.0.attn_q.weight", 128, 0, 8, tied=False) == Q.Q5_1
    assert mixture_type("q4_k_m", "blk.0.attn_v.weight", 128, 0, 8, tied=False) == Q.Q8_0  # Q6_K -> Q8_0
    assert mixture_type("q4_k_m", "output.weight", 96, None, 8, tied=False) == Q.Q8_0
    assert mixture_type("q4_k_m", "blk.0.ffn_down.weight", 344, 0, 8, tied=False) == Q.F16


def test_export_q4_k_m_tensor_types_and_values(tmp_path):
    """Widths 256 (attention: 4 heads of 64, embeddings) and 320 (down_proj rows: not a k-quant width):
    types follow the mixture, with a warning naming the fallbacks; matrices decode close to HF's."""
    model = export_lm("qwen3", 300, hidden_size=256, intermediate_size=320, head_dim=64, tie_word_embeddings=True)
    fallbacks = r"blk\.0\.ffn_down\.weight -> Q5_0 \(rows of 320\), blk\.1\.ffn_down\.weight -> Q8_0 \(rows of 320\)$"
    with pytest.warns(UserWarning, match=fallbacks):
        path = export_gguf(model, tmp_path / "m.gguf", dtype="q4_k_m")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert reader.get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert "output.weight" not in tensors and tensors["token_embd.weight"].tensor_type == Q.Q6_K  # tied
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q.Q4_K
    assert tensors["blk.1.attn_v.weight"].tensor_type == Q.Q6_K  # the last layer gets more bits
    assert tensors["blk.0.ffn_down.weight"].tensor_type == Q.Q5_0  # rows of 320: Q4_K falls back
    assert tensors["blk.1.ffn_down.weight"].tensor_type == Q.Q8_0  # Q6_K falls back
    assert tensors["blk.0.ffn_up.weight"].tensor_type == Q.Q4_K
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
    state = model.state_dict()
    for hf_name, gguf_name in [("model.layers.0.mlp.up_proj.weight", "blk.0.ffn_up.weight"),
                               ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight"),
                               ("model.embed_tokens.weight", "token_embd.weight")]:  # fmt: skip
        tensor = tensors[gguf_name]
        back = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(state[hf_name].shape)
        source = state[hf_name].numpy()
        assert np.linalg.norm(back - source) / np.linalg.norm(source) < 0.09, gguf_name


# ---------------------------------------------------------------- tokenizer metadata


def read_fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}


def export_with(tmp_path, family: str, model_type: str = "llama", **kwargs):
    tokenizer = family_tokenizer(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_gguf(
            export_lm(model_type, len(tokenizer)), tmp_path / f"{family}.gguf", tokenizer=tokenizer, **kwargs
        )
    return tokenizer, read_fields(path)


@pytest.mark.parametrize(
    "family, model, pre, add_bos",
    [("gpt2", "gpt2", "gpt-2", False), ("llama3", "gpt2", "llama-bpe", True), ("qwen2", "gpt2", "qwen2", False)],
)
def test_byte_level_bpe_metadata(tmp_path, family, model, pre, add_bos):
    tokenizer, fields = export_with(tmp_path, family)
    assert fields["tokenizer.ggml.model"] == model and fields["tokenizer.ggml.pre"] == pre
    assert fields["tokenizer.ggml.add_bos_token"] is add_bos and fields["tokenizer.ggml.add_eos_token"] is False
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id


@pytest.mark.parametrize("family, model_type, prefix", [("llama2", "llama", True), ("gemma", "gemma", False)])
def test_sentencepiece_metadata(tmp_path, family, model_type, prefix):
    tokenizer, fields = export_with(tmp_path, family, model_type)
    vocab = tokenizer.get_vocab()
    types = fields["tokenizer.ggml.token_type"]
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"] is prefix  # Metaspace prepends; Gemma's normaliser does not
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert types[vocab["<0x41>"]] == gguf.TokenType.BYTE
    assert types[vocab["<unk>"]] == gguf.TokenType.UNKNOWN
    assert types[tokenizer.bos_token_id] == gguf.TokenType.CONTROL
    # scores follow the merge order: the token of an earlier merge scores higher
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    first, later = ("".join(m) if isinstance(m, list) else m.replace(" ", "") for m in (merges[0], merges[50]))
    scores = fields["tokenizer.ggml.scores"]
    assert scores[vocab[first]] > scores[vocab[later]]


def test_wordlevel_metadata_writes_an_empty_merges_list(tmp_path):
    tokenizer = family_tokenizer("wordlevel")
    with pytest.warns(UserWarning, match="drops characters outside the vocabulary"):
        path = export_gguf(export_lm("llama", len(tokenizer)), tmp_path / "w.gguf", tokenizer=tokenizer)
    fields = read_fields(path)
    vocab = tokenizer.get_vocab()
    assert fields["tokenizer.ggml.model"] == "whitespace" and fields["tokenizer.ggml.pre"] == "whitespace"
    assert fields["tokenizer.ggml.merges"] == []  # present though empty: llama.cpp needs the key
    types = fields["tokenizer.ggml.token_type"]
    assert types[vocab["reverse:"]] == gguf.TokenType.USER_DEFINED and types[vocab["q"]] == gguf.TokenType.NORMAL
    assert types[vocab["<bos>"]] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.add_bos_token"] is False  # the demo adds <bos> itself, the tokenizer does not


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="a", eos_token="b")


def unigram():
    return wrap(Tokenizer(models.Unigram([("a", -1.0), ("b", -2.0), ("c", -3.0)], unk_id=0)))


def other_split_regex():
    tokenizer = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\w+|\d"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return wrap(tokenizer)


def byte_level_prefix_space():
    tokenizer = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    return wrap(tokenizer)


@pytest.mark.parametrize(
    "make, message",
    [
        (unigram, "not Unigram"),
        (other_split_regex, "no pre-tokenizer with the split regex"),
        (byte_level_prefix_space, "adds a prefix space"),
        (lambda: Tokenizer(models.BPE()), "fast tokenizer"),
    ],
)
def test_unsupported_tokenizers_fail_before_writing(tmp_path, make, message):
    target = tmp_path / "x.gguf"
    with pytest.raises(NotImplementedError, match=message):
        export_gguf(export_lm("llama", 8), target, tokenizer=make())
    assert not target.exists()


def test_a_tokenizer_larger_than_the_embedding_fails_before_writing(tmp_path):
    tokenizer = family_tokenizer("gpt2")
    target = tmp_path / "x.gguf"
    with pytest.raises(ValueError, match=f"token id {len(tokenizer) - 1}, the model's vocab_size is 100"):
        export_gguf(export_lm("llama", 100), target, tokenizer=tokenizer)
    assert not target.exists()


# ---------------------------------------------------------------- Ollama Modelfile

CHATML_TEMPLATE = (
    '{{ range $i, $_ := .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
    '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
    '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n{{ end }}'
    '{{ if and (eq (len (slice $.Messages $i)) 1) (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}{{ end }}'
)


def test_modelfile_beside_the_gguf(tmp_path):
    tokenizer = family_tokenizer("qwen2")
    model = export_lm("qwen2", len(tokenizer))
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.7
    model.generation_config.top_p, model.generation_config.top_k = 0.9, 20
    export_gguf(model, tmp_path / "chat.gguf", tokenizer=tokenizer, modelfile=True)
    text = (tmp_path / "Modelfile").read_text()
    assert text == (
        f'FROM ./chat.gguf\nTEMPLATE """{CHATML_TEMPLATE}"""\nPARAMETER stop "<|im_end|>"\n'
        "PARAMETER temperature 0.7\nPARAMETER top_p 0.9\nPARAMETER top_k 20\n"
    )
    with pytest.raises(FileExistsError, match="Modelfile"):  # kept unless overwrite=True
        export_gguf(model, tmp_path / "other.gguf", tokenizer=tokenizer, modelfile=True)
    assert not (tmp_path / "other.gguf").exists()


def test_modelfile_pieces_rebuild_each_template():
    """Llama 3 (BOS text left to llama.cpp's add-BOS), Gemma (no system role: no system branch), Mistral
    (system messages dropped by the template: dropped by Ollama too)."""
    llama3 = chat_pieces(family_tokenizer("llama3"), strip_bos=True)
    assert llama3.start == "" and llama3.user == ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>")
    assert llama3.generation == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    gemma = chat_pieces(family_tokenizer("gemma"), strip_bos=False)
    assert gemma.start == "<bos>" and gemma.system is None
    assert gemma.assistant == ("<start_of_turn>model\n", "<end_of_turn>\n")
    mistral = chat_pieces(family_tokenizer("mistral"), strip_bos=True)
    assert mistral.user == ("[INST] ", " [/INST]") and mistral.assistant == ("", "</s>") and mistral.system is None
    conversation = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "ok"},
    ]
    assert "<s>" + mistral.render(conversation, False) == family_tokenizer("mistral").apply_chat_template(
        conversation, tokenize=False
    )


def test_modelfile_refuses_a_template_it_cannot_rebuild(tmp_path):
    tokenizer = family_tokenizer("gpt2")
    default_system = (
        "{% if messages[0]['role'] != 'system' %}{{ 'default system\n' }}{% endif %}"
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    )
    with pytest.raises(NotImplementedError, match="fixed text around each message"):
        modelfile_text(
            "m.gguf",
            PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, chat_template=default_system),
            None,
        )
    target = tmp_path / "m.gguf"
    bad = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, chat_template=default_system, eos_token="<|endoftext|>"
    )
    with pytest.raises(NotImplementedError):
        export_gguf(export_lm("llama", len(tokenizer)), target, tokenizer=bad, modelfile=True)
    assert not target.exists() and not (tmp_path / "Modelfile").exists()
