"""patch_model: patched HF causal LMs compute what the unpatched ones do, on instances only."""

import copy
import importlib
import pickle

import pytest
import torch
from helpers import assert_close_scaled, hook_outputs
from tiny_models import ARCHITECTURES, PATCHING_VOCAB, patching_gpt2, patching_lm, patching_lora
from torch import nn

from lightning_fastft.architectures import ARCHITECTURES as ARCH_SPECS
from lightning_fastft.attention import use_varlen_attention
from lightning_fastft.patching import patch_model

BATCH, SEQ, VOCAB = 2, 7, PATCHING_VOCAB


def random_batch(device, position_ids=None):
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), device=device)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), device=device)
    labels[0, :2] = -100
    batch = {"input_ids": input_ids, "labels": labels}
    if position_ids is not None:
        batch["position_ids"] = position_ids.to(device)
    return batch


def trainable_gradients(model):
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def check_patched_matches(reference, patched, batch, grad_rtol=1e-4):
    """Training step with labels: same loss and gradients, no logits; eval: same logits."""
    reference.train()
    patched.train()
    expected = reference(**batch)
    actual = patched(**batch)
    assert actual.logits is None
    assert_close_scaled(actual.loss, expected.loss, 1e-5)
    expected.loss.backward()
    actual.loss.backward()
    expected_grads, actual_grads = trainable_gradients(reference), trainable_gradients(patched)
    assert expected_grads.keys() == actual_grads.keys()
    for name, grad in expected_grads.items():
        assert actual_grads[name] is not None, name
        assert_close_scaled(actual_grads[name], grad, grad_rtol)

    reference.eval()
    patched.eval()
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        assert_close_scaled(patched(**inputs).logits, reference(**inputs).logits, 1e-5)


def replaced_forwards(model, class_suffix):
    modules = [m for m in model.modules() if type(m).__name__.endswith(class_suffix)]
    assert modules
    return ["forward" in m.__dict__ for m in modules]


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_patched_model_matches_hf(model_type, device):
    reference = patching_lm(model_type).to(device)
    patched = copy.deepcopy(reference)
    report = patch_model(patched)
    counts = report.models[0].patched
    norms_per_layer = {"qwen3": 4, "gemma2": 4}.get(model_type, 2)
    assert counts["rms_norm"] == 2 * norms_per_layer + 1
    assert (counts["attention"], counts["rope"], counts["mlp"], counts["cross_entropy"]) == (2, 2, 2, 1)
    check_patched_matches(reference, patched, random_batch(device))


@pytest.mark.parametrize(
    ("model_type", "fused_lora"),
    [("llama", True), ("qwen3", True), ("gemma2", True), ("llama", False)],
    ids=["llama-fused_lora", "qwen3-fused_lora", "gemma2-fused_lora", "llama-peft_lora"],
)
def test_patched_peft_lora_matches_hf(model_type, fused_lora, device):
    reference = patching_lora(patching_lm(model_type, attn_implementation="eager")).to(device)
    patched = copy.deepcopy(reference)
    counts = patch_model(patched, fused_lora=fused_lora).models[0].patched
    fused = 2 if fused_lora else 0  # plain fp32 LoRA without dropout is fusable on every projection
    assert (counts["lora_qkv"], counts["lora_o"], counts["lora_mlp"], counts["mlp"]) == (fused, fused, fused, 2 - fused)
    check_patched_matches(reference, patched, random_batch(device))


@pytest.mark.parametrize("hooked", [False, True], ids=["plain", "hooked"])
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_recompute_skips_the_mlp_down_projection(model_type, hooked, device, monkeypatch):
    """Nothing reads the MLP's output in a checkpointed layer's recompute where the layer only adds it
    to the residual: its down projection is skipped there (2 of 3 projections recomputed per layer),
    the gradients still equal HF's. Gemma2 normalises the MLP's output first, and a forward hook on
    the MLP sees it: then it is computed."""
    lora_kernels = importlib.import_module("lightning_fastft.kernels.lora")
    reference = patching_lora(patching_lm(model_type, attn_implementation="eager")).to(device)
    patched = copy.deepcopy(reference)
    patch_model(patched, checkpointing="recompute")
    if hooked:
        hook_outputs("MLP", patched, reference)
    downs = []  # per projection: whether it is a down projection (its input has the intermediate size)
    project = lora_kernels._project

    def counting_project(x, w, dtype, xa=None):
        downs.append(x.shape[-1] == patched.config.intermediate_size)
        return project(x, w, dtype, xa)

    monkeypatch.setattr(lora_kernels, "_project", counting_project)
    check_patched_matches(reference, patched, random_batch(device))
    recomputed = hooked or not ARCH_SPECS[model_type].mlp_output_to_residual
    assert sum(downs) == (3 if recomputed else 2) * patched.config.num_hidden_layers  # forward, recompute, eval


@pytest.mark.parametrize("model_type", ARCH_SPECS)
def test_decoder_layers_add_the_mlp_output_as_the_table_says(model_type):
    """``ArchitectureSpec.mlp_output_to_residual`` against the installed transformers: True exactly
    where the line after the MLP's call adds its output to the residual and no later line but the
    return reads the hidden state (then a recompute may skip computing it)."""
    import inspect

    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    source = inspect.getsource(getattr(modeling, f"{ARCH_SPECS[model_type].class_prefix}DecoderLayer").forward)
    lines = [line.strip() for line in source[source.index("self.mlp(hidden_states)") :].splitlines()[1:]]
    lines = [line for line in lines if line and not line.startswith("#")]
    adds = lines[0] == "hidden_states = residual + hidden_states" and all(
        line.startswith("return") for line in lines[1:] if "hidden_states" in line
    )
    assert adds == ARCH_SPECS[model_type].mlp_output_to_residual, source


@pytest.mark.parametrize("switch", ["rms_norm", "rope", "mlp", "cross_entropy"])
def test_each_switch_turns_its_part_off(switch, device):
    reference = patching_lm("qwen3").to(device)
    model = copy.deepcopy(reference)
    report = patch_model(model, **{switch: False}, fused_lora=False)
    replaced = {
        "rms_norm": replaced_forwards(model, "RMSNorm"),
        "rope": replaced_forwards(model, "Attention"),
        "mlp": replaced_forwards(model, "MLP"),
        "cross_entropy": ["forward" in model.__dict__],
    }
    for kind, flags in replaced.items():
        assert all(flags) if kind != switch else not any(flags), kind
    assert report.models[0].patched[switch] == 0
    assert f"{switch}: switched off" in str(report)
    if switch != "cross_entropy":  # (cross_entropy off is checked below: logits stay)
        check_patched_matches(reference, model, random_batch(device))


def test_cross_entropy_off_keeps_logits_in_training(device):
    reference = patching_lm("llama").to(device)
    model = copy.deepcopy(reference)
    patch_model(model, cross_entropy=False)
    batch = random_batch(device)
    output, expected = model(**batch), reference(**batch)
    assert_close_scaled(output.logits, expected.logits, 1e-5)
    assert_close_scaled(output.loss, expected.loss, 1e-5)


def test_rope_off_keeps_fused_lora_attention_with_hf_rotary(device):
    reference = patching_lora(patching_lm("llama")).to(device)
    model = copy.deepcopy(reference)
    counts = patch_model(model, rope=False).models[0].patched
    assert counts["rope"] == 0 and counts["attention"] == counts["lora_qkv"] == 2
    check_patched_matches(reference, model, random_batch(device))


def test_two_models_in_one_process_are_independent(device):
    first = patching_lm("gemma").to(device)
    second = copy.deepcopy(first)
    classes = {type(m): type(m).forward for m in second.modules()}
    patch_model(first)
    assert not any("forward" in m.__dict__ for m in second.modules())
    assert all(cls.forward is forward for cls, forward in classes.items())
    batch = random_batch(device)
    first.eval()
    second.eval()
    with torch.no_grad():
        assert_close_scaled(first(batch["input_ids"]).logits, second(batch["input_ids"]).logits, 1e-5)


def test_patching_twice_is_a_no_op_and_models_inside_containers_are_found(device):
    class Container(nn.Module):  # e.g. a LightningModule holding a policy and a reference model
        def __init__(self):
            super().__init__()
            self.policy = patching_lora(patching_lm("qwen2"))
            self.reference = patching_lm("mistral")

    container = Container().to(device)
    report = patch_model(container)
    assert [(m.path, m.model_type) for m in report.models] == [
        ("policy.base_model.model", "qwen2"),
        ("reference", "mistral"),
    ]
    forwards = {name: m.__dict__["forward"] for name, m in container.named_modules() if "forward" in m.__dict__}
    assert len(forwards) == 2 * (5 + 2 + 2 + 1)
    second_report = patch_model(container)
    assert str(second_report) == str(report)
    assert forwards == {name: m.__dict__["forward"] for name, m in container.named_modules() if "forward" in m.__dict__}


def test_unsupported_architecture_warns_and_still_trains(device):
    model = patching_gpt2().to(device)
    with pytest.warns(UserWarning, match="no patching spec for model_type 'gpt2'"):
        report = patch_model(model)
    assert sum(report.models[0].patched.values()) == 0
    assert not any("forward" in m.__dict__ for m in model.modules())
    model.train()
    loss = model(**random_batch(device)).loss
    loss.backward()
    assert torch.isfinite(loss) and model.lm_head.weight.grad.abs().sum() > 0


def test_no_causal_lm_warns():
    with pytest.warns(UserWarning, match="no Hugging Face causal LM found"):
        assert patch_model(nn.Linear(3, 3)).models == []


def test_position_ids_restarting_inside_a_row(device):
    reference = patching_lm("llama").to(device)
    patched = copy.deepcopy(reference)
    use_varlen_attention(reference)  # HF's own attention lets packed samples see each other
    patch_model(patched)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 0, 1]])
    check_patched_matches(reference, patched, random_batch(device, position_ids))


def test_logits_to_keep_loss_kwargs_and_tuple_output(device):
    reference = patching_lm("gemma2").to(device)
    patched = copy.deepcopy(reference)
    patch_model(patched)
    batch = random_batch(device)
    reference.eval()
    patched.eval()
    with torch.no_grad():
        expected = reference(batch["input_ids"], logits_to_keep=2).logits
        actual = patched(batch["input_ids"], logits_to_keep=2).logits
    assert actual.shape == (BATCH, 2, VOCAB)
    assert_close_scaled(actual, expected, 1e-5)

    reference.train()
    patched.train()
    shift_labels = torch.roll(batch["labels"], -1, dims=1)
    loss_kwargs = {"num_items_in_batch": torch.tensor(5, device=device), "shift_labels": shift_labels}
    expected = reference(**batch, **loss_kwargs).loss
    actual = patched(**batch, **loss_kwargs, return_dict=False)
    assert isinstance(actual, tuple)
    assert_close_scaled(actual[0], expected, 1e-5)


def test_patched_model_deep_copies_pickles_and_generates(device):
    reference = patching_lm("qwen2").to(device).eval()
    patched = copy.deepcopy(reference)
    patch_model(patched)
    input_ids = random_batch(device)["input_ids"]
    for clone in (copy.deepcopy(patched), pickle.loads(pickle.dumps(patched))):
        forwards = [m.__dict__["forward"] for m in clone.modules() if "forward" in m.__dict__]
        assert len(forwards) == 10 and all(f.module in set(clone.modules()) for f in forwards)
        with torch.no_grad():
            assert_close_scaled(clone(input_ids).logits, reference(input_ids).logits, 1e-5)
    generate = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(patched.generate(input_ids, **generate), reference.generate(input_ids, **generate))
