"""Generation with patched models equals Hugging Face's, KV cache included, on every architecture.

Training losses cannot show a broken KV cache (training never reads it): these tests decode with
the cache, compare every step's scores and tokens with an unpatched copy, and check the cache
holds the prompt after prefill.
"""

import copy

import pytest
import torch
from helpers import assert_close_scaled
from tiny_models import ARCHITECTURES, PATCHING_VOCAB, patching_lm, patching_lora
from transformers import AutoModelForCausalLM, DynamicCache

from lightning_fastft.export.merged import merge_and_save
from lightning_fastft.patching import model as patching
from lightning_fastft.patching import patch_model

PROMPT_LEN, NEW_TOKENS = 6, 8
VOCAB = PATCHING_VOCAB


def prompts(device, batch=2):
    return torch.randint(1, VOCAB, (batch, PROMPT_LEN), device=device)


def generate(model, input_ids, seed=0, **settings):
    """Scores and tokens of one ``generate`` call (seeded, so sampling repeats)."""
    torch.manual_seed(seed)
    out = model.generate(
        input_ids,
        max_new_tokens=NEW_TOKENS,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
        **settings,
    )
    return torch.stack(out.scores), out.sequences


def assert_same_generation(patched, reference, input_ids, **settings):
    scores, sequences = generate(patched, input_ids, **settings)
    expected_scores, expected_sequences = generate(reference, input_ids, **settings)
    assert torch.equal(sequences, expected_sequences)
    finite = expected_scores.isfinite()  # sampling masks filtered tokens with -inf
    assert torch.equal(scores.isfinite(), finite)
    assert_close_scaled(scores[finite], expected_scores[finite], 1e-4)


def patched_pair(model_type, device):
    reference = patching_lm(model_type).to(device).eval()
    patched = copy.deepcopy(reference)
    patch_model(patched)
    return patched, reference


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_prefill_fills_the_kv_cache(model_type, device):
    patched, _ = patched_pair(model_type, device)
    cache = DynamicCache(config=patched.config)
    with torch.no_grad():
        out = patched(prompts(device), use_cache=True, **{patching.CACHE_ARGUMENT: cache})
    assert getattr(out, patching.CACHE_ARGUMENT) is cache
    assert cache.get_seq_length() == PROMPT_LEN


@pytest.mark.parametrize("model_type", ARCHITECTURES)
@pytest.mark.parametrize(
    "settings",
    [
        {"do_sample": False},
        {"do_sample": True, "top_k": 20, "temperature": 0.9},
        {"do_sample": False, "cache_implementation": "static"},
    ],
    ids=["greedy", "sampling", "static_cache"],
)
def test_generation_matches_hf(model_type, settings, device):
    patched, reference = patched_pair(model_type, device)
    assert_same_generation(patched, reference, prompts(device), use_cache=True, **settings)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_left_padded_batch_generation_matches_hf(model_type, device):
    patched, reference = patched_pair(model_type, device)
    input_ids = prompts(device, batch=3)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # left padding of different lengths
    attention_mask[1, :1] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    assert_same_generation(patched, reference, input_ids, attention_mask=attention_mask, do_sample=False)


def test_trained_lora_generates_like_hf_before_and_after_merge(tmp_path, device):
    """A PEFT LoRA model trained while patched generates like an unpatched copy of it, and its
    merged export (reloaded, patched) like the same export unpatched."""
    model = patching_lora(patching_lm("llama")).to(device)
    patch_model(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        batch = prompts(device, batch=4)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    reference = patching_lora(patching_lm("llama")).to(device).eval()
    reference.load_state_dict(model.state_dict())
    input_ids = prompts(device)
    assert_same_generation(model, reference, input_ids, do_sample=False)

    merge_and_save(model, tmp_path / "merged", dtype=torch.float32)
    merged_reference = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").to(device).eval()
    merged = copy.deepcopy(merged_reference)
    patch_model(merged)
    assert_same_generation(merged, merged_reference, input_ids, do_sample=False)
    assert torch.equal(generate(merged, input_ids)[1], generate(reference, input_ids)[1])


def test_unknown_hf_forward_keeps_hf_code_with_a_warning(device):
    """A class whose forward takes arguments the patch was not written for keeps HF's forward."""
    reference = patching_lm("llama").to(device).eval()
    model = copy.deepcopy(reference)
    hf_attention = type(model.model.layers[0].self_attn)

    def forward(self, hidden_states, position_embeddings, attention_mask, new_cache_argument=None, **kwargs):
        return hf_attention.forward(self, hidden_states, position_embeddings, attention_mask, **kwargs)

    renamed = type(hf_attention.__name__, (hf_attention,), {"forward": forward})
    for layer in model.model.layers:
        layer.self_attn.__class__ = renamed
    with pytest.warns(UserWarning, match=r"LlamaAttention\.forward.*new_cache_argument.*forward is kept"):
        report = patch_model(model)
    assert report.models[0].patched["attention"] == 0 and report.models[0].patched["rms_norm"] == 5
    assert any("LlamaAttention.forward" in reason for reason in report.models[0].skipped)
    assert all("forward" not in layer.self_attn.__dict__ for layer in model.model.layers)
    assert_same_generation(model, reference, prompts(device), do_sample=False)
