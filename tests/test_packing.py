"""Sequence packing (rows, collators) and the fastft_varlen attention that keeps packed samples apart."""

import copy
import warnings

import pytest
import torch
from helpers import NO_PATCHES, RecordLosses, quiet_trainer
from tiny_models import PACKING, PACKING_VOCAB, packing_gpt2, packing_llama_config, packing_lm
from torch.utils.data import DataLoader
from transformers import LlamaForCausalLM

from lightning_fastft.data import (
    IGNORE_INDEX,
    PackedCollator,
    PaddedCollator,
    pack_dataset,
    pack_sequences,
    token_utilisation,
)
from lightning_fastft.module import CausalLMFineTune
from lightning_fastft.patching import patch_model
from lightning_fastft.attention import (
    ATTN_IMPLEMENTATION,
    find_segments,
    packed_attention,
    use_varlen_attention,
)

VOCAB = PACKING_VOCAB


def random_samples(lengths, *, with_prompts=True):
    """Samples of random tokens; every other one has a prompt (loss_mask 0) or explicit labels."""
    samples = []
    for i, length in enumerate(lengths):
        input_ids = torch.randint(3, VOCAB, (length,)).tolist()
        prompt = length // 3 if with_prompts else 0
        if i % 3 == 1:
            samples.append({"input_ids": input_ids, "loss_mask": [0] * prompt + [1] * (length - prompt)})
        elif i % 3 == 2:
            samples.append({"input_ids": input_ids, "labels": [IGNORE_INDEX] * prompt + input_ids[prompt:]})
        else:
            samples.append({"input_ids": input_ids})
    return samples


def expected_labels(sample):
    if "labels" in sample:
        return list(sample["labels"])
    mask = sample.get("loss_mask", [1] * len(sample["input_ids"]))
    return [tok if keep else IGNORE_INDEX for tok, keep in zip(sample["input_ids"], mask)]


def naive_first_fit_decreasing(lengths, capacity):
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins, room = [], []
    for i in order:
        for b, free in enumerate(room):
            if free >= lengths[i]:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def split_row(row):
    """The samples of a packed row, as (input_ids, labels) pairs."""
    out, start = [], 0
    for length in row["seq_lens"]:
        out.append((row["input_ids"][start : start + length], row["labels"][start : start + length]))
        start += length
    return out


# ---------------------------------------------------------------- packing


def test_pack_sequences_is_first_fit_decreasing_with_uncontaminated_labels():
    max_seq_len = 37
    lengths = torch.randint(1, max_seq_len + 1, (83,)).tolist()  # many ties: FFD keeps input order
    samples = random_samples(lengths)
    rows = pack_sequences(samples, max_seq_len)

    reference = naive_first_fit_decreasing(lengths, max_seq_len)
    assert len(rows) == len(reference)
    for row, bin_items in zip(rows, reference):
        assert len(row["input_ids"]) == sum(row["seq_lens"]) <= max_seq_len
        assert row["seq_lens"] == [lengths[i] for i in bin_items]
        assert row["position_ids"] == [p for n in row["seq_lens"] for p in range(n)]
        for (ids, labels), i in zip(split_row(row), bin_items):
            assert ids == samples[i]["input_ids"]
            assert labels == [IGNORE_INDEX] + expected_labels(samples[i])[1:]
    assert sorted(i for b in reference for i in b) == list(range(len(samples)))


def test_pack_sequences_long_samples_are_truncated_or_split():
    samples = random_samples([5, 23, 9], with_prompts=False)
    with pytest.warns(UserWarning, match="truncated 1 sample"):
        rows = pack_sequences(samples, 10)
    assert sorted(n for row in rows for n in row["seq_lens"]) == [5, 9, 10]
    assert any(ids == samples[1]["input_ids"][:10] for row in rows for ids, _ in split_row(row))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = pack_sequences(samples, 10, split_long=True)
    pieces = [ids for row in rows for ids, _ in split_row(row)]
    long_sample = samples[1]["input_ids"]
    for chunk in (long_sample[:10], long_sample[10:20], long_sample[20:]):
        assert chunk in pieces
    assert sorted(map(len, pieces)) == [3, 5, 9, 10, 10]


def test_pack_dataset_columns():
    import datasets

    samples = random_samples([11, 3, 7, 6, 2])
    dataset = datasets.Dataset.from_list([{"input_ids": s["input_ids"], "labels": expected_labels(s)} for s in samples])
    packed = pack_dataset(dataset, 13)
    assert set(packed.column_names) == {"input_ids", "labels", "position_ids", "seq_lens"}
    assert packed.to_list() == pack_sequences(dataset, 13)
    assert sum(sum(r) for r in packed["seq_lens"]) == 29


# ---------------------------------------------------------------- collators


def test_packed_collator_tensors_are_consistent():
    samples = random_samples([13, 4, 9, 7, 1, 11, 6])
    rows = pack_sequences(samples, 16)
    batch = PackedCollator(pad_token_id=1)(rows)
    packed_on_the_fly = PackedCollator(16, pad_token_id=1)(samples)
    for key, value in batch.items():
        same = torch.equal if isinstance(value, torch.Tensor) else (lambda a, b: a == b)
        assert same(value, packed_on_the_fly[key]), key
    batch_size, row_len = batch["input_ids"].shape
    assert batch_size == len(rows) and row_len % 8 == 0 and row_len >= 16
    for key in ("input_ids", "labels", "position_ids"):
        assert batch[key].dtype == torch.long and batch[key].shape == (batch_size, row_len)

    cu = batch["cu_seq_lens_q"]
    assert cu.dtype == torch.int32 and cu is batch["cu_seq_lens_k"]
    flat_positions = batch["position_ids"].view(-1)
    assert torch.equal(cu[:-1].long(), torch.nonzero(flat_positions == 0).view(-1))
    assert cu[-1] == batch_size * row_len
    assert batch["max_length_q"] == batch["max_length_k"] == int((cu[1:] - cu[:-1]).max())
    # no sample predicts across a boundary, and padding is never a target
    assert (batch["labels"].view(-1)[cu[:-1].long()] == IGNORE_INDEX).all()
    real_tokens = sum(len(s["input_ids"]) for s in samples)
    assert batch["num_real_tokens"] == real_tokens
    for r, row in enumerate(rows):
        used = sum(row["seq_lens"])
        assert batch["input_ids"][r, :used].tolist() == row["input_ids"]
        assert batch["labels"][r, :used].tolist() == row["labels"]
        assert (batch["input_ids"][r, used:] == 1).all() and (batch["labels"][r, used:] == IGNORE_INDEX).all()
    assert token_utilisation([batch]) == pytest.approx(real_tokens / (batch_size * row_len))


def test_packed_collator_rejects_a_batch_of_only_empty_samples():
    """Empty samples among others are dropped; a batch with no tokens at all is a clear error."""
    samples = random_samples([0, 5, 0, 3])
    rows = pack_sequences(samples, 8)
    assert [row["seq_lens"] for row in rows] == [[5, 3]]
    assert torch.equal(PackedCollator(8)(samples)["input_ids"], PackedCollator()(rows)["input_ids"])

    empty = random_samples([0, 0])
    assert pack_sequences(empty, 8) == []
    empty_row = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
    for collate, features in ((PackedCollator(8), empty), (PackedCollator(), [empty_row]), (PackedCollator(), [])):
        with pytest.raises(ValueError, match="no tokens"):
            collate(features)


def test_padded_collator_and_utilisation():
    samples = random_samples([5, 12, 3])
    batch = PaddedCollator(pad_token_id=2)(samples)
    assert batch["input_ids"].shape == (3, 16)
    assert batch["attention_mask"].sum(1).tolist() == [5, 12, 3]
    for r, sample in enumerate(samples):
        n = len(sample["input_ids"])
        assert batch["labels"][r, :n].tolist() == expected_labels(sample)
        assert (batch["labels"][r, n:] == IGNORE_INDEX).all() and (batch["input_ids"][r, n:] == 2).all()
    assert token_utilisation([batch, batch]) == pytest.approx(20 / 48)


# ---------------------------------------------------------------- attention function


def test_segments_from_cu_seq_lens_position_ids_and_padding_agree(device):
    batch = PackedCollator(12)(random_samples([5, 3, 6, 2, 9, 4]))
    batch_size, row_len = batch["input_ids"].shape
    from_cu = find_segments(batch_size, row_len, device, cu_seq_lens=batch["cu_seq_lens_q"].to(device))
    from_pos = find_segments(batch_size, row_len, device, position_ids=batch["position_ids"].to(device))
    assert torch.equal(from_cu.ids, from_pos.ids) and torch.equal(from_cu.cu_seq_lens, from_pos.cu_seq_lens)
    assert torch.equal(from_cu.cu_seq_lens.cpu(), batch["cu_seq_lens_q"])
    assert from_cu.max_length == from_pos.max_length == batch["max_length_q"]

    left_padded = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]], device=device)
    segments = find_segments(2, 5, device, position_ids=torch.arange(5, device=device)[None], padding_mask=left_padded)
    assert segments.ids.tolist() == [[0, 0, 1, 1, 1], [2, 2, 2, 2, 3]]


def reference_attention(query, key, value, seq_lens, scaling, sliding_window, softcap):
    """Each segment of the flattened (1, H, T, D) input attended on its own with HF's eager math."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    outs, start = [], 0
    for n in seq_lens:
        q, k, v = (t[:, :, start : start + n].float() for t in (query, key, value))
        scores = q @ k.transpose(-1, -2) * scaling
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        i = torch.arange(n, device=q.device)
        allowed = i[None, :] <= i[:, None]
        if sliding_window is not None:
            allowed &= i[:, None] - i[None, :] < sliding_window
        outs.append(scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v)
        start += n
    return torch.cat(outs, 2).transpose(1, 2)


def available_backends(device, dtype):
    if device != "cuda":
        return ["dense"]
    return ["dense", "flex"] + (["varlen"] if dtype != torch.float32 else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sliding_window,softcap", [(None, None), (4, None), (None, 1.5)])
def test_packed_attention_matches_per_segment_attention(device, dtype, sliding_window, softcap):
    seq_lens = [7, 1, 12, 5, 3]  # one row of 28 tokens
    heads, kv_heads, head_dim = 4, 2, 16
    total = sum(seq_lens)
    query = torch.randn(1, heads, total, head_dim, device=device, dtype=dtype)
    key = torch.randn(1, kv_heads, total, head_dim, device=device, dtype=dtype)
    value = torch.randn(1, kv_heads, total, head_dim, device=device, dtype=dtype)
    positions = torch.cat([torch.arange(n) for n in seq_lens])[None].to(device)
    segments = find_segments(1, total, device, position_ids=positions)
    expected = reference_attention(query, key, value, seq_lens, 0.3, sliding_window, softcap)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for backend in available_backends(device, dtype):
        if backend == "varlen" and softcap is not None:
            continue
        out = packed_attention(
            query, key, value, segments, scaling=0.3, sliding_window=sliding_window, softcap=softcap, backend=backend
        )
        torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol, msg=lambda m: f"{backend}: {m}")


# ---------------------------------------------------------------- whole models

SAMPLE_LENGTHS = [9, 1, 13, 6, 11, 4, 7]  # rows of 16 hold 14, 15, 16 and 6 tokens


def per_sample_loss_and_grads(model, samples, device):
    """Summed token loss and its gradients, each sample run alone without padding (HF's default attention)."""
    model.zero_grad()
    total = 0.0
    for sample in samples:
        input_ids = torch.tensor([sample["input_ids"]], device=device)
        labels = torch.tensor([expected_labels(sample)], device=device)
        loss = model(input_ids=input_ids, labels=labels, num_items_in_batch=1).loss
        loss.backward()
        total += loss.item()
    return total, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def packed_loss_and_grads(model, batch, device):
    model.zero_grad()
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    loss = model(**inputs, num_items_in_batch=1).loss
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(actual, expected, rtol=1e-4):
    (loss, grads), (ref_loss, ref_grads) = actual, expected
    assert loss == pytest.approx(ref_loss, rel=rtol)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grad, ref_grads[name], rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


def check_packed_equals_unpacked(model, device, reference_model=None, *, position_ids_only_too=True):
    """Packed loss/grads of ``model`` == per-sample loss/grads of ``reference_model`` (default: itself)."""
    samples = random_samples(SAMPLE_LENGTHS)
    expected = per_sample_loss_and_grads(reference_model or model, samples, device)
    use_varlen_attention(model)
    batch = PackedCollator(16)(samples)
    assert batch["input_ids"].shape == (4, 16)
    assert_same_loss_and_grads(packed_loss_and_grads(model, batch, device), expected)
    if position_ids_only_too:  # boundaries found from position_ids alone give the same result
        position_only = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
        assert_same_loss_and_grads(packed_loss_and_grads(model, position_only, device), expected)


@pytest.mark.parametrize("arch", sorted(PACKING))
def test_packed_batch_equals_samples_run_alone(arch, device):
    check_packed_equals_unpacked(packing_lm(arch).to(device), device)


@pytest.mark.parametrize("arch", sorted(PACKING))
def test_packed_batch_equals_samples_run_alone_patched(arch, device):
    """Patched modules on the packed batch vs HF's own modules per sample (kernels are slow on CPU: one run)."""
    model = packing_lm(arch, num_hidden_layers=1).to(device)
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one-time kernel fallback notices
        patch_model(model)
    check_packed_equals_unpacked(model, device, reference, position_ids_only_too=False)


def test_plain_causal_attention_or_unmasked_starts_contaminate(device):
    """The equality above can fail: without segment isolation or start masking the numbers differ."""
    model = packing_lm("llama").to(device)
    samples = random_samples(SAMPLE_LENGTHS)
    ref_loss, ref_grads = per_sample_loss_and_grads(model, samples, device)
    batch = PackedCollator(16)(samples)

    # HF sdpa with a 2D all-ones mask builds one causal mask per row: samples see their row neighbours
    plain_causal = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
    plain_causal["attention_mask"] = torch.ones_like(batch["input_ids"])
    loss, grads = packed_loss_and_grads(model, plain_causal, device)
    assert abs(loss - ref_loss) > 1e-3 * abs(ref_loss)

    # isolated attention, but labels that let a sample's last token predict the next sample's first
    use_varlen_attention(model)
    leaky = dict(batch, labels=batch["labels"].clone())
    for r, row in enumerate(pack_sequences(samples, 16)):
        for start in torch.tensor([0] + row["seq_lens"][:-1]).cumsum(0).tolist():
            leaky["labels"][r, start] = batch["input_ids"][r, start]
    assert (leaky["labels"] != batch["labels"]).sum() == len(SAMPLE_LENGTHS)
    loss, _ = packed_loss_and_grads(model, leaky, device)
    assert abs(loss - ref_loss) > 1e-3 * abs(ref_loss)


def test_padded_batches_and_kv_cache_decoding_match_sdpa(device):
    model = packing_lm("mistral").to(device).eval()
    reference = copy.deepcopy(model)
    use_varlen_attention(model)
    samples = random_samples([9, 4, 12])
    with torch.no_grad():
        # left padding (generation style) and right padding (PaddedCollator): logits of real tokens match
        batch = PaddedCollator()(samples)
        left_ids = torch.stack([row.roll(int(row.eq(0).sum())) for row in batch["input_ids"]]).to(device)
        left_mask = torch.stack([row.roll(int(row.eq(0).sum())) for row in batch["attention_mask"]]).to(device)
        for ids, mask in ((batch["input_ids"].to(device), batch["attention_mask"].to(device)), (left_ids, left_mask)):
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            got = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            want = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-4)

        # decoding with a KV cache, sliding window longer than the prompt
        ids = torch.tensor([samples[2]["input_ids"]], device=device)
        prefix = model(input_ids=ids[:, :-2], use_cache=True)
        step = model(input_ids=ids[:, -2:], past_key_values=prefix.past_key_values)
        full = reference(input_ids=ids).logits
        torch.testing.assert_close(step.logits, full[:, -2:], rtol=1e-4, atol=1e-4)


def test_use_varlen_attention_switches_only_that_instance():
    config = packing_llama_config()
    switched, other = LlamaForCausalLM(config), LlamaForCausalLM(config)
    hf_model = use_varlen_attention(switched)
    assert hf_model is switched and switched.config._attn_implementation == ATTN_IMPLEMENTATION
    assert all(layer.self_attn.config is switched.config for layer in switched.model.layers)
    assert other.config._attn_implementation == config._attn_implementation == "sdpa"
    assert other.model.layers[0].self_attn.config is config

    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    base = use_varlen_attention(wrapped)
    assert base is wrapped.get_base_model() and base.config._attn_implementation == ATTN_IMPLEMENTATION
    assert config._attn_implementation == "sdpa"
    batch = PackedCollator(16)(random_samples([5, 9]))
    assert torch.isfinite(wrapped(**batch).loss)


@pytest.mark.parametrize("arch", sorted(PACKING))
def test_trainer_packed_batch_equals_samples_run_alone(arch, device):
    """``Trainer(strategy="fastft")`` on PackedCollator batches, with no ``use_varlen_attention`` call,
    gives the mean token loss of the samples run alone (HF's sdpa would let them see each other)."""
    model = packing_lm(arch, num_hidden_layers=1).to(device)  # one layer: the kernels are slow on CPU
    samples = random_samples(SAMPLE_LENGTHS)
    summed_loss, _ = per_sample_loss_and_grads(copy.deepcopy(model), samples, device)
    targets = sum(label != IGNORE_INDEX for sample in samples for label in expected_labels(sample)[1:])
    module = CausalLMFineTune()
    module.model = model
    losses = RecordLosses()
    trainer = quiet_trainer(device, strategy="fastft", max_steps=1, callbacks=[losses])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one-time kernel fallback notices, Lightning's dataloader hints
        trainer.fit(module, DataLoader(samples, batch_size=len(samples), collate_fn=PackedCollator(16)))
    assert losses.losses[0] == pytest.approx(summed_loss / targets, rel=1e-4)


def test_patched_model_switches_attention_per_batch(device):
    """Packed batches run fastft_varlen; unpacked ones (padded, generation) the model's own attention;
    an explicit ``use_varlen_attention`` stays in force."""
    model = packing_lm("mistral").to(device)
    patch_model(model, **NO_PATCHES)
    seen = []  # the attention implementation the first attention layer runs, one entry per forward
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda attention, args: seen.append(attention.config._attn_implementation)
    )
    samples = random_samples([5, 9, 3])
    packed = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in PackedCollator(16)(samples).items()}
    padded = {k: v.to(device) for k, v in PaddedCollator()(samples).items()}
    left_ids, left_mask = (
        torch.stack([row.roll(int(row.eq(0).sum())) for row in padded[key]]) for key in ("input_ids", "attention_mask")
    )
    with torch.no_grad():
        model(**packed)
        model(**padded, position_ids=(padded["attention_mask"].cumsum(1) - 1).clamp(min=0))
        model(**{k: packed[k] for k in ("input_ids", "labels", "position_ids")})  # boundaries from positions only
        model.generate(input_ids=left_ids, attention_mask=left_mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
        use_varlen_attention(model)
        model(**padded)
    assert seen == [ATTN_IMPLEMENTATION, "sdpa", ATTN_IMPLEMENTATION, "sdpa", "sdpa", ATTN_IMPLEMENTATION]


def test_packed_batch_that_varlen_attention_cannot_serve_raises():
    """A patched model of an architecture without a varlen route, or with a non-empty KV cache, refuses packed rows."""
    batch = PackedCollator(16)(random_samples([5, 9]))
    gpt2 = packing_gpt2()
    with pytest.warns(UserWarning, match="left unpatched"):
        patch_model(gpt2)
    with pytest.raises(ValueError, match=r"model_type 'gpt2'\) got a packed batch .* only for llama, mistral"):
        gpt2(**batch)

    llama = packing_lm("llama")
    patch_model(llama, **NO_PATCHES)
    prefix = llama(input_ids=batch["input_ids"][:, :3], use_cache=True).past_key_values
    with pytest.raises(ValueError, match="packed batch .* non-empty KV cache"):
        llama(**batch, past_key_values=prefix)


def test_dense_path_gradients_match_per_segment_reference(device):
    """Backward through the segment mask: the gradient of each segment depends only on that segment."""
    seq_lens = [6, 3, 8]
    total = sum(seq_lens)
    query, key, value = (torch.randn(1, 2, total, 8, device=device, requires_grad=True) for _ in range(3))
    positions = torch.cat([torch.arange(n) for n in seq_lens])[None].to(device)
    segments = find_segments(1, total, device, position_ids=positions)
    weights = torch.randn(1, total, 2, 8, device=device)
    (packed_attention(query, key, value, segments, scaling=0.35, backend="dense") * weights).sum().backward()
    got = [t.grad.clone() for t in (query, key, value)]
    for t in (query, key, value):
        t.grad = None
    (reference_attention(query, key, value, seq_lens, 0.35, None, None) * weights).sum().backward()
    for g, t in zip(got, (query, key, value)):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-5)
