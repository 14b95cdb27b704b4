"""gpt-oss's mixture of experts: the clamped SwiGLU kernel, the experts op in gpt-oss's layout
(biases, (E, in, out) weights, interleaved gate/up) and the patched ``GptOssMLP`` blocks against
Hugging Face.

The generic MoE tests (test_moe: full fine-tuning vs HF, 20 Lightning steps, bf16 on a GPU) run
gpt-oss from the same registry (``tiny_models.MOE``). Here: the kernel against fp64 on odd sizes
with values on both sides of the clamp limit, the experts op against an fp64 reference and HF's own
``GptOssExperts``, LoRA on attention and the stacked experts, packed batches (attention sinks in
the varlen path), offloaded checkpointing, and a gpt-oss variant the patch does not know. The tiny
model's clamp is shown to be at work, so that equality with HF covers the clamped branches.
"""

import copy
import warnings

import pytest
import torch
from test_moe import _assert_same_training, _batches, _lora_model, _moe_layers, _patch, _routing, assert_close
from test_packing import check_packed_equals_unpacked
from tiny_models import moe_lm

from lightning_fastft.kernels.clamped_swiglu import (
    ClampedSwiGLU,
    clamped_swiglu,
    clamped_swiglu_backward,
    clamped_swiglu_backward_weighted,
    clamped_swiglu_reference,
)
from lightning_fastft.kernels.moe import ExpertLora, moe_experts, moe_experts_reference
from lightning_fastft.patching import patch_model

ALPHA, LIMIT = 1.702, 7.0


def _gate_up_values(shape, device):
    """Interleaved (gate, up) values of std 6: many pass the limit 7 on either side."""
    return torch.randn(shape, device=device) * 6


def _assert_clamp_at_work(gate_up: torch.Tensor):
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    assert (gate > LIMIT).any() and (gate < LIMIT).any(), "gate clamp not exercised"
    assert (up > LIMIT).any() and (up < -LIMIT).any() and (up.abs() < LIMIT).any(), "up clamp not exercised"


# ---------------------------------------------------------------- kernel


@pytest.mark.parametrize("shape", [(7, 2 * 23), (3, 5, 2 * 37), (2, 2 * 1031)])
def test_clamped_swiglu_matches_fp64_reference(device, shape):
    gate_up = _gate_up_values(shape, device).requires_grad_()
    _assert_clamp_at_work(gate_up)
    dh = torch.randn(*shape[:-1], shape[-1] // 2, device=device)
    h = clamped_swiglu(gate_up, ALPHA, LIMIT)
    (grad,) = torch.autograd.grad(h, gate_up, dh)

    gate_up64 = gate_up.detach().double().requires_grad_()
    h64 = clamped_swiglu_reference(gate_up64, ALPHA, LIMIT)
    (grad64,) = torch.autograd.grad(h64, gate_up64, dh.double())
    assert_close(h, h64)
    assert_close(grad, grad64)
    # the clamps block the gradient outside [-limit, limit] (the gate's only above)
    gate, up = gate_up.detach()[..., ::2], gate_up.detach()[..., 1::2]
    assert grad[..., ::2][gate > LIMIT].abs().max() == 0 and grad[..., 1::2][up.abs() > LIMIT].abs().max() == 0
    assert grad[..., ::2][gate < LIMIT].abs().max() > 0 and grad[..., 1::2][up.abs() < LIMIT].abs().max() > 0


def test_clamped_swiglu_reference_is_hugging_face_gate():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    gate_up = _gate_up_values((9, 2 * 13), "cpu").double()
    experts = GptOssExperts.__new__(GptOssExperts)  # _apply_gate reads only alpha and limit
    experts.alpha, experts.limit = ALPHA, LIMIT
    want = experts._apply_gate(gate_up)
    torch.testing.assert_close(clamped_swiglu_reference(gate_up, ALPHA, LIMIT), want, rtol=0, atol=0)


def test_clamped_swiglu_strided_rows_and_h_from_backward(device):
    """Rows of gate_up one stride apart with a gap (a slice of a wider buffer); the backward
    recomputes h on request."""
    wide = _gate_up_values((6, 2 * 19 + 5), device)
    gate_up = wide[:, : 2 * 19]
    dh = torch.randn(6, 19, device=device)
    h, grad = clamped_swiglu_backward(dh, gate_up, ALPHA, LIMIT, return_h=True)
    gate_up64 = gate_up.double().requires_grad_()
    h64 = clamped_swiglu_reference(gate_up64, ALPHA, LIMIT)
    (grad64,) = torch.autograd.grad(h64, gate_up64, dh.double())
    assert_close(h, h64)
    assert_close(grad, grad64)


def test_clamped_swiglu_weighted_backward(device):
    """Rows scaled by routing weights after the gate: the gate/up gradient for c_s * dh_s, h and
    dc_s = <dh_s, h_s> against fp64, on values past the clamp limit."""
    gate_up = _gate_up_values((9, 2 * 41), device)
    dh, weights = torch.randn(9, 41, device=device), torch.rand(9, device=device)
    h, grad, dc = clamped_swiglu_backward_weighted(dh, gate_up, weights, ALPHA, LIMIT)
    gate_up64, c64 = gate_up.double().requires_grad_(), weights.double().requires_grad_()
    h64 = clamped_swiglu_reference(gate_up64, ALPHA, LIMIT)
    (c64[:, None] * h64).backward(dh.double())
    _assert_clamp_at_work(gate_up)
    assert_close(h, h64)
    assert_close(grad, gate_up64.grad)
    assert_close(dc, c64.grad)
    with pytest.raises(ValueError, match="does not match"):
        clamped_swiglu_backward_weighted(dh[:, :40], gate_up, weights, ALPHA, LIMIT)


def test_clamped_swiglu_rejects_bad_input(device):
    with pytest.raises(ValueError, match="even"):
        clamped_swiglu(torch.randn(3, 7, device=device))
    with pytest.raises(ValueError, match="does not match"):
        clamped_swiglu_backward(torch.randn(3, 4, device=device), torch.randn(3, 10, device=device), ALPHA, LIMIT)


# ---------------------------------------------------------------- experts op, gpt-oss layout


def _gpt_oss_inputs(tokens, hidden_size, inter, experts, rank, with_lora, device):
    inputs = {
        "hidden": torch.randn(tokens, hidden_size, device=device),
        "gate_up": torch.randn(experts, hidden_size, 2 * inter, device=device) * 1.3,  # (E, in, out)
        "down": torch.randn(experts, inter, hidden_size, device=device) * 0.3,
        "gate_up_bias": torch.randn(experts, 2 * inter, device=device),
        "down_bias": torch.randn(experts, hidden_size, device=device),
    }
    if with_lora:
        inputs |= {
            "gu_b": torch.randn(experts, 2 * inter, rank, device=device) * 0.3,
            "gu_a": torch.randn(experts, rank, hidden_size, device=device) * 0.3,
            "d_b": torch.randn(experts, hidden_size, rank, device=device),
            "d_a": torch.randn(experts, rank, inter, device=device),
        }
    return inputs


@pytest.mark.parametrize("with_lora", [False, True])
def test_moe_experts_gpt_oss_layout_matches_reference(device, with_lora):
    tokens, hidden_size, inter, experts, top_k, rank = 13, 21, 11, 7, 2, 3
    index, weights = _routing(tokens, experts, top_k, [2, 5], device)
    inputs = {"weights": weights, **_gpt_oss_inputs(tokens, hidden_size, inter, experts, rank, with_lora, device)}
    u = torch.einsum("th,tkhi->tki", inputs["hidden"], inputs["gate_up"][index]) + inputs["gate_up_bias"][index]
    _assert_clamp_at_work(u)  # the routed (token, expert) pairs' gate/up values, base weights
    dout = torch.randn(tokens, hidden_size, device=device)

    def run(op, dtype):
        leaves = {name: t.to(dtype).requires_grad_() for name, t in inputs.items()}
        lora = {}
        if with_lora:
            lora = {
                "gate_up_lora": ExpertLora(leaves["gu_b"], leaves["gu_a"], 0.5),
                "down_lora": ExpertLora(leaves["d_b"], leaves["d_a"], 0.25),
            }
        out = op(
            leaves["hidden"], index, leaves["weights"], leaves["gate_up"], leaves["down"], ClampedSwiGLU(ALPHA, LIMIT),
            **lora, gate_up_bias=leaves["gate_up_bias"], down_bias=leaves["down_bias"], transposed=True,
        )  # fmt: skip
        grads = torch.autograd.grad((out * dout.to(dtype)).sum(), list(leaves.values()))
        return out, dict(zip(leaves, grads))

    out, grads = run(moe_experts, torch.float32)
    want_out, want_grads = run(moe_experts_reference, torch.float64)
    assert_close(out, want_out)
    for name, grad in grads.items():
        assert_close(grad, want_grads[name], msg=name)
    for name in ("gate_up", "down", "gate_up_bias", "down_bias"):  # experts 2 and 5 got no token
        assert grads[name][2].abs().max() == 0 and grads[name][5].abs().max() == 0, name


def test_moe_experts_reference_is_hugging_face_gpt_oss_experts():
    """The fp64 reference above against HF's own eager ``GptOssExperts`` forward (fp64)."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    tokens, hidden_size, inter, experts, top_k = 11, 21, 11, 6, 2
    config = GptOssConfig(hidden_size=hidden_size, intermediate_size=inter, num_local_experts=experts)
    config._experts_implementation = "eager"
    hf = GptOssExperts(config).double()
    inputs = _gpt_oss_inputs(tokens, hidden_size, inter, experts, 0, False, "cpu")
    with torch.no_grad():
        for name in ("gate_up", "down"):
            getattr(hf, f"{name}_proj").copy_(inputs[name])
            getattr(hf, f"{name}_proj_bias").copy_(inputs[f"{name}_bias"])
    index, weights = _routing(tokens, experts, top_k, [4], "cpu")
    hidden, weights = inputs["hidden"].double(), weights.double()
    want = hf(hidden, index, weights)
    got = moe_experts_reference(
        hidden, index, weights, hf.gate_up_proj, hf.down_proj, ClampedSwiGLU(hf.alpha, hf.limit),
        gate_up_bias=hf.gate_up_proj_bias, down_bias=hf.down_proj_bias, transposed=True,
    )  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_moe_experts_rejects_bad_gpt_oss_shapes(device):
    hidden = torch.randn(4, 6, device=device)
    index, weights = _routing(4, 3, 2, [], device)
    gate_up, down = torch.randn(3, 6, 8, device=device), torch.randn(3, 4, 6, device=device)
    with pytest.raises(ValueError, match=r"gate_up must be \(E, H, 2I\)"):
        moe_experts(hidden, index, weights, gate_up.transpose(1, 2), down, transposed=True)
    with pytest.raises(ValueError, match=r"gate_up_bias must be \(E, 8\)"):
        bias = torch.randn(3, 4, device=device)
        moe_experts(hidden, index, weights, gate_up, down, gate_up_bias=bias, transposed=True)


# ---------------------------------------------------------------- patched gpt-oss vs HF


def _routed_gate_up(model, device) -> torch.Tensor:
    """Every routed (token, expert) pair's gate/up values in the tiny model's layers on the test
    batches, as HF's experts compute them (base weights)."""
    values = []

    def record(experts, args):
        hidden, index, _ = args
        gate_up = torch.einsum("th,tkhi->tki", hidden, experts.gate_up_proj[index])
        values.append(gate_up + experts.gate_up_proj_bias[index])

    hooks = [layer.mlp.experts.register_forward_pre_hook(record) for layer in model.model.layers]
    with torch.no_grad():
        for ids, mask in _batches(device):
            model(input_ids=ids, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    return torch.cat([v.reshape(-1, v.shape[-1]) for v in values])


def test_tiny_gpt_oss_clamp_is_at_work(device):
    """moe_lm("gpt_oss") sends gate and up values past the limit on both sides, so the
    model-level equalities (here and in test_moe) cover the clamped branches."""
    model = moe_lm("gpt_oss").to(device)
    assert model.model.layers[0].mlp.experts.limit == LIMIT
    _assert_clamp_at_work(_routed_gate_up(model, device))


def test_patched_gpt_oss_block_returns_routing_weights(device):
    """The patched GptOssMLP returns (output, routing weights) as HF's does."""
    reference = moe_lm("gpt_oss", num_hidden_layers=1).to(device)
    model = copy.deepcopy(reference)
    _patch(model)
    hidden = torch.randn(2, 5, 36, device=device)
    out, scores = model.model.layers[0].mlp(hidden)
    want_out, want_scores = reference.model.layers[0].mlp(hidden)
    assert_close(out, want_out)
    torch.testing.assert_close(scores, want_scores, rtol=0, atol=0)


def test_patched_gpt_oss_lora_matches_hf(device):
    """LoRA (attach_lora's all-linear: q/k/v/o with their biases, the stacked experts; the biased
    router stays frozen) fused into the grouped GEMMs and the QKV/O kernels; HF's attention
    function with the sinks."""
    reference = _lora_model("gpt_oss", device)
    trainable = [name for name, p in reference.named_parameters() if p.requires_grad]
    assert any("experts" in name for name in trainable) and not any("router" in name for name in trainable)
    model = copy.deepcopy(reference)
    entry = _patch(model)
    layers = model.config.num_hidden_layers
    assert entry.patched["moe"] == entry.patched["lora_experts"] == _moe_layers(model) == layers, str(entry)
    assert entry.patched["lora_qkv"] == entry.patched["lora_o"] == entry.patched["rope"] == layers, str(entry)
    _assert_same_training(model, reference, device)


def test_packed_gpt_oss_batch_equals_samples_run_alone(device):
    """A packed (varlen) batch through patched gpt-oss layers == HF per sample: the sinks reach the
    varlen attention (dense path), layer 0 slides its 4-token window."""
    model = moe_lm("gpt_oss", output_router_logits=False).to(device)
    reference = copy.deepcopy(model)
    _patch(model)
    check_packed_equals_unpacked(model, device, reference, position_ids_only_too=False)


def test_offloaded_checkpointing_through_gpt_oss_layers(device):
    reference = _lora_model("gpt_oss", device)
    model = copy.deepcopy(reference)
    entry = _patch(model, checkpointing="offload")
    assert entry.patched["lora_experts"] == model.config.num_hidden_layers
    _assert_same_training(model, reference, device)


def test_unknown_gpt_oss_gate_keeps_hf_forward_and_trains(device):
    """An experts class of the same name with another gate (a future gpt-oss variant) is not
    run by the kernels: HF's block forward stays, with a warning naming the feature."""
    reference = moe_lm("gpt_oss").to(device).train()
    blocks = [layer.mlp for layer in reference.model.layers]
    hf_experts = type(blocks[0].experts)

    def other_gate(self, gate_up):
        return hf_experts._apply_gate(self, gate_up) * 0.5

    variant = type(hf_experts.__name__, (hf_experts,), {"_apply_gate": other_gate})
    for block in blocks:
        block.experts.__class__ = variant
    model = copy.deepcopy(reference)
    with pytest.warns(UserWarning, match="GptOssMLP has a post-expert norm or custom gate activation"):
        entry = patch_model(model).models[0]
    assert entry.patched["moe"] == 0 and entry.patched["cross_entropy"] == 1
    assert not any("forward" in layer.mlp.__dict__ for layer in model.model.layers)
    _assert_same_training(model, reference, device)


def test_gpt_oss_sinks_leave_no_backend_but_dense(device):
    from lightning_fastft.attention import find_segments, packed_attention

    query, key = torch.randn(1, 2, 5, 8, device=device), torch.randn(1, 1, 5, 8, device=device)
    segments = find_segments(1, 5, device)
    with pytest.raises(ValueError, match="sinks run on the dense backend only"):
        packed_attention(query, key, key, segments, scaling=0.3, sinks=torch.zeros(2, device=device), backend="flex")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        packed_attention(query, key, key, segments, scaling=0.3, sinks=torch.zeros(2, device=device))
