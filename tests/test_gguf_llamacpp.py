"""GGUF files from ``export_gguf`` in the real llama.cpp (node-llama-cpp 3.21.1's prebuilt CPU build).

For every tokenizer family (trained offline, ``tiny_tokenizers.py``) on the model families that use
it: llama.cpp tokenises and detokenises a multilingual test set as HF does, has HF's BOS/EOS and
add-BOS behaviour, and in f16 gives HF's log-probabilities and greedy tokens. K-quant files load,
run, and stay close to HF. All files of a test go through one node process.
"""

from __future__ import annotations

import warnings

import gguf
import numpy as np
import pytest
import torch
from llamacpp_client import llamacpp, require_llamacpp
from tiny_models import export_lm
from tiny_tokenizers import TEXTS, family_tokenizer

from lightning_fastft.export import export_gguf
from lightning_fastft.export.gguf_tokenizer import vocab_family
from lightning_fastft.export.quants import quantize_k

# (tokenizer family, model_type): every tokenizer family on the architectures that ship it
CASES = [
    ("gpt2", "llama"),
    ("llama3", "llama"),
    ("qwen2", "qwen2"),
    ("qwen2", "qwen3"),
    ("llama2", "llama"),
    ("mistral", "mistral"),
    ("gemma", "gemma"),
    ("gemma", "gemma2"),
    ("wordlevel", "llama"),
]
# The demo's domain: lowercase words, its two task words, whitespace runs (the only text the
# word-level vocabulary covers; outside it HF yields <unk> where llama.cpp drops the character).
WORDLEVEL_TEXTS = [
    "reverse: hello answer:",
    "reverse: xkcdq answer: qdckx",
    "  reverse:answer:\tabc\n\ndef  ",
    "answer:reverse:answers",
    "the quick brown fox jumps over the lazy dog",
]
GREEDY_TOKENS = 4
N_PROMPTS = 6


def texts_for(family: str) -> list[str]:
    if family == "wordlevel":
        return WORDLEVEL_TEXTS
    if vocab_family_of(family).model == "llama":
        # llama.cpp prepends "▁" even to a text that starts with a space (HF's Metaspace does not)
        return [text for text in TEXTS if not text.startswith(" ")]
    return TEXTS


def vocab_family_of(family: str):
    import json

    return vocab_family(json.loads(family_tokenizer(family).backend_tokenizer.to_str()))


def expected_detokenized(tokenizer, family: str, ids: list[int]) -> str:
    text = tokenizer.decode(ids)
    if vocab_family_of(family).pre in ("gpt-2", "llama-bpe"):
        text = tokenizer.clean_up_tokenization(text)  # llama.cpp's detokeniser does this for these two
    return text


def prompts(tokenizer, family: str) -> list[list[int]]:
    """Token prompts (with BOS where the tokenizer adds it) from the family's texts."""
    texts = texts_for(family)
    return [tokenizer(texts[i % len(texts)])["input_ids"][: 8 + i] for i in range(N_PROMPTS)]


def f16_rounded(model):
    """The model with f16-representable weights: HF on these is what an f16 file holds."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    return model


@torch.no_grad()
def hf_logprobs(model, ids: list[int]) -> np.ndarray:
    logits = model(torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, -1)
    return np.array([logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)])


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], float]:
    """Greedy continuation and the smallest top-1/top-2 logit gap along it."""
    ids = list(ids)
    out, gap = [], float("inf")
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1].double()
        top = torch.topk(logits, 2)
        gap = min(gap, float(top.values[0] - top.values[1]))
        out.append(int(top.indices[0]))
        ids.append(out[-1])
    return out, gap


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory):
    """Every case exported in f16 and asked of llama.cpp in one run: {case: (tokenizer, model, job, answer)}."""
    require_llamacpp()  # before the exports: skip (or fail under scripts/test.sh) at once
    folder = tmp_path_factory.mktemp("families")
    cases, jobs = {}, []
    for family, model_type in CASES:
        tokenizer = family_tokenizer(family)
        model = f16_rounded(export_lm(model_type, len(tokenizer) + 3))  # +3: padded with unused tokens
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the word-level vocabulary's unknown-character warning
            path = export_gguf(model, folder / f"{family}-{model_type}.gguf", tokenizer=tokenizer)
        texts = texts_for(family)
        job = {
            "model": str(path),
            "tokenize": texts,
            "detokenize": [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts],
            "greedy": [{"ids": p, "n": GREEDY_TOKENS} for p in prompts(tokenizer, family)],
            "logprobs": prompts(tokenizer, family),
        }
        cases[(family, model_type)] = (tokenizer, model, job)
        jobs.append(job)
    answers = llamacpp(jobs)
    return {case: (*cases[case], answer) for case, answer in zip(cases, answers)}


@pytest.mark.parametrize("family, model_type", CASES)
def test_llamacpp_tokenizes_and_detokenizes_like_hf(family_runs, family, model_type):
    tokenizer, _, job, answer = family_runs[(family, model_type)]
    for text, hf_ids, llama_ids in zip(job["tokenize"], job["detokenize"], answer["tokenize"]):
        assert llama_ids == hf_ids, f"{family} tokenises {text!r} differently"
    for hf_ids, llama_text in zip(job["detokenize"], answer["detokenize"]):
        assert llama_text == expected_detokenized(tokenizer, family, hf_ids)


@pytest.mark.parametrize("family, model_type", CASES)
def test_llamacpp_special_tokens_are_hf(family_runs, family, model_type):
    tokenizer, _, _, answer = family_runs[(family, model_type)]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    hf_adds_bos = len(full) > len(plain) and full[0] == tokenizer.bos_token_id
    assert answer["add_bos"] == hf_adds_bos
    assert answer["eos"] == tokenizer.eos_token_id
    if tokenizer.bos_token_id is not None:
        assert answer["bos"] == tokenizer.bos_token_id


@pytest.mark.parametrize("family, model_type", CASES)
def test_llamacpp_f16_logprobs_and_greedy_tokens_are_hf(family_runs, family, model_type):
    """HF runs the f16-rounded weights in fp32; llama.cpp's f16 matmuls round activations (2e-3 measured)."""
    tokenizer, model, job, answer = family_runs[(family, model_type)]
    for ids, llama_logprobs in zip(job["logprobs"], answer["logprobs"]):
        np.testing.assert_allclose(np.array(llama_logprobs), hf_logprobs(model, ids), atol=1e-2, rtol=0)
    decided = 0
    for request, llama_tokens in zip(job["greedy"], answer["greedy"]):
        hf_tokens, gap = hf_greedy(model, request["ids"], request["n"])
        if tokenizer.eos_token_id in hf_tokens:  # llama.cpp stops at the end token and does not return it
            hf_tokens = hf_tokens[: hf_tokens.index(tokenizer.eos_token_id)]
        if gap > 0.01:  # not a near-tie that rounding may flip
            decided += 1
            assert llama_tokens == hf_tokens
    assert decided >= N_PROMPTS // 2, f"only {decided} of {N_PROMPTS} greedy runs free of near-ties"


# ---------------------------------------------------------------- k-quant files in llama.cpp


def as_stored(model, path):
    """A copy of ``model`` whose matrices are what the GGUF file at ``path`` stores (gguf's own
    dequantisers; q/k row permutation does not matter: quantisation blocks run along rows)."""
    import copy

    reader = gguf.GGUFReader(path)
    stored = {t.name: t for t in reader.tensors}
    arch_name = reader.get_field("general.architecture").contents()
    arch = next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name)
    names = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in copied.named_parameters():
            tensor = stored.get(names.get_name(name, try_suffixes=(".weight", ".bias")) or "")
            if tensor is None or parameter.dim() != 2:
                continue
            blocks = (
                gguf.quants.quantize(parameter.numpy(), tensor.tensor_type)
                if tensor.tensor_type
                in (
                    gguf.GGMLQuantizationType.F16,
                    gguf.GGMLQuantizationType.Q8_0,
                    gguf.GGMLQuantizationType.Q5_0,
                    gguf.GGMLQuantizationType.Q5_1,
                )
                else quantize_k(parameter, tensor.tensor_type)
            )
            parameter.copy_(
                torch.from_numpy(gguf.quants.dequantize(blocks, tensor.tensor_type).reshape(parameter.shape))
            )
    return copied


def mean_abs_error(answer, model, sequences) -> float:
    reference = [hf_logprobs(model, ids) for ids in sequences]
    return float(np.mean([np.abs(np.array(l) - r).mean() for l, r in zip(answer["logprobs"], reference)]))


def test_kquant_files_load_run_and_stay_close_to_hf(tmp_path):
    """Hidden 256 (4 heads of 64) / intermediate 512: every matrix is k-quantised (rows of 256), with llama.cpp's
    mixture. llama.cpp on each file gives the log-probabilities of HF on the weights as stored
    (read back with the gguf package's dequantisers) up to its own rounding of activations,
    so it decodes our blocks as written; the error against the original weights grows as bits shrink."""
    require_llamacpp()
    tokenizer = family_tokenizer("llama3")
    model = export_lm("llama", len(tokenizer), hidden_size=256, intermediate_size=512, head_dim=64)
    texts = [t for t in TEXTS if len(tokenizer(t)["input_ids"]) >= 12]
    sequences = [tokenizer(t)["input_ids"][:24] for t in texts]
    dtypes = ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m"]
    paths, jobs = [], []
    for dtype in dtypes:
        path = export_gguf(model, tmp_path / f"{dtype}.gguf", dtype=dtype, tokenizer=tokenizer)
        types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
        if dtype in ("q4_k_m", "q5_k_m"):  # llama.cpp's mixture on 2 layers: layer 1 gets more bits
            base = gguf.GGMLQuantizationType.Q4_K if dtype == "q4_k_m" else gguf.GGMLQuantizationType.Q5_K
            assert types["blk.0.attn_v.weight"] == base and types["blk.0.ffn_down.weight"] == base
            assert types["blk.1.attn_v.weight"] == gguf.GGMLQuantizationType.Q6_K
            assert types["blk.1.ffn_down.weight"] == gguf.GGMLQuantizationType.Q6_K
            assert types["blk.0.attn_q.weight"] == base and types["token_embd.weight"] == base
            assert types["output.weight"] == gguf.GGMLQuantizationType.Q6_K
        paths.append(path)
        jobs.append({"model": str(path), "logprobs": sequences, "greedy": [{"ids": s[:8], "n": 3} for s in sequences]})
    answers = llamacpp(jobs)
    to_original = {d: mean_abs_error(a, model, sequences) for d, a in zip(dtypes, answers)}
    to_stored = {d: mean_abs_error(a, as_stored(model, p), sequences) for d, a, p in zip(dtypes, answers, paths)}
    # measured: to the original 0.003 / 0.05 / 0.13 / 0.30 / 0.51, to the stored 0.002 / 0.03 / 0.05 / 0.05 / 0.05
    # (llama.cpp rounds activations to 8 bits for quantised matmuls)
    assert list(to_original.values()) == sorted(to_original.values())  # more bits, closer to HF
    for dtype in dtypes:
        assert to_stored[dtype] < 0.1, dtype
    for dtype in ("q6_k", "q5_k_m", "q4_k_m"):
        assert to_stored[dtype] < to_original[dtype] / 2, dtype
    for dtype, answer in zip(dtypes, answers):  # generation runs (greedy agreement: the trained-model benchmark)
        assert all(0 < len(tokens) <= 3 for tokens in answer["greedy"]), dtype
