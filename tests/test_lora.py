"""Fused LoRA MLP / QKV / O against PEFT's own modules: outputs, input and LoRA-weight grads."""

import copy
import functools

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from tiny_models import LORA_HIDDEN, LORA_VOCAB, lora_llama
from torch import nn

from lightning_fastft.kernels import lora as lora_kernels
from lightning_fastft.kernels.lora import LoRAWeights, lora_linear, lora_mlp
from lightning_fastft.patching import lora as lora_patching
from lightning_fastft.patching.lora import GLU_MLP, O_PROJ, QKV, projection_plan, projection_plans
from lightning_fastft.patching.model import patch_model

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def make_fused_qkv(attn):
    plans = projection_plans(attn, QKV)
    return None if plans is None else functools.partial(lora_patching.fused_qkv, plans)


def make_fused_o(attn):
    plans = projection_plans(attn, O_PROJ)
    return None if plans is None else functools.partial(lora_patching.fused_o, plans)


def make_fused_mlp(mlp, activation):
    plans = projection_plans(mlp, GLU_MLP)
    return None if plans is None else functools.partial(lora_patching.fused_mlp, plans, activation=activation)


def _rel_error(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def _run(fn, x, module, grad_outputs):
    """Outputs, dx and the module's trainable-parameter grads of one forward + backward."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    outputs = fn(x)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward(outputs, grad_outputs)
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return [o.detach() for o in outputs], x.grad, grads


def _assert_matches(fused_fn, reference_fn, module, x, tolerance):
    with torch.no_grad():
        probe = reference_fn(x)
    grad_outputs = [torch.randn_like(o) for o in (probe if isinstance(probe, tuple) else (probe,))]
    expected_out, expected_dx, expected_grads = _run(reference_fn, x, module, grad_outputs)
    out, dx, grads = _run(fused_fn, x, module, grad_outputs)
    assert len(out) == len(expected_out)
    for actual, expected in zip(out, expected_out):
        assert actual.shape == expected.shape and actual.dtype == expected.dtype
        assert _rel_error(actual, expected) < tolerance
    assert dx.dtype == x.dtype and _rel_error(dx, expected_dx) < tolerance
    assert grads.keys() == expected_grads.keys() and grads
    for name in grads:
        assert _rel_error(grads[name], expected_grads[name]) < tolerance, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mlp_matches_peft(dtype, device):
    model, layer = lora_llama(device, dtype)
    fused = make_fused_mlp(layer.mlp, model.config.hidden_act)
    assert fused is not None
    x = torch.randn(2, 7, LORA_HIDDEN, device=device, dtype=dtype)
    _assert_matches(fused, layer.mlp, layer.mlp, x, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_qkv_matches_peft(dtype, device):
    model, layer = lora_llama(device, dtype)
    attn = layer.self_attn
    fused = make_fused_qkv(attn)
    assert fused is not None
    x = torch.randn(3, 5, LORA_HIDDEN, device=device, dtype=dtype)
    reference = lambda x: (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))  # noqa: E731
    _assert_matches(fused, reference, attn, x, TOLERANCE[dtype])
    assert [t.shape for t in fused(x)] == [(3, 5, 72), (3, 5, 24), (3, 5, 24)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_o_matches_peft(dtype, device):
    model, layer = lora_llama(device, dtype)
    attn = layer.self_attn
    fused = make_fused_o(attn)
    assert fused is not None
    x = torch.randn(3, 5, LORA_HIDDEN, device=device, dtype=dtype)
    _assert_matches(fused, attn.o_proj, attn, x, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projections_of_one_input_with_unequal_ranks(dtype, device):
    """Q/K/V and gate/up take ``x A^T`` and ``dA`` from one matmul over their stacked ``A``: unequal
    ranks (PEFT's ``rank_pattern``) are split back to the right projection, forward and backward."""
    model, layer = lora_llama(device, dtype, rank_pattern={"k_proj": 3, "v_proj": 11, "up_proj": 5})
    attn = layer.self_attn
    ranks = [module.lora_A["default"].weight.shape[0] for module in (attn.q_proj, attn.k_proj, layer.mlp.up_proj)]
    assert ranks == [8, 3, 5]
    x = torch.randn(2, 5, LORA_HIDDEN, device=device, dtype=dtype)
    reference = lambda x: (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))  # noqa: E731
    _assert_matches(make_fused_qkv(attn), reference, attn, x, TOLERANCE[dtype])
    _assert_matches(make_fused_mlp(layer.mlp, model.config.hidden_act), layer.mlp, layer.mlp, x, TOLERANCE[dtype])


def test_partial_targets_fuse_plain_projections(device):
    """LoRA on q, v, gate, up only: k_proj and down_proj are plain frozen linears."""
    model, layer = lora_llama(device, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"])
    attn, mlp = layer.self_attn, layer.mlp
    assert projection_plan(attn.k_proj).weights().lora_A is None
    assert projection_plan(attn.q_proj).weights().lora_A is not None
    x = torch.randn(2, 9, LORA_HIDDEN, device=device)
    reference = lambda x: (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))  # noqa: E731
    _assert_matches(make_fused_qkv(attn), reference, attn, x, 1e-4)
    _assert_matches(make_fused_mlp(mlp, "silu"), mlp, mlp, x, 1e-4)


def _direct_weights(device, in_features, out_features, rank, bias=True):
    lora_A = torch.randn(rank, in_features, device=device, requires_grad=True)
    lora_B = torch.randn(out_features, rank, device=device, requires_grad=True)
    base = torch.randn(out_features, in_features, device=device) / in_features**0.5
    b = torch.randn(out_features, device=device) if bias else None
    return LoRAWeights(base, None, b, lora_A, lora_B, 0.37)


def _reference_linear(x, w):
    return F.linear(x, w.base, w.bias) + w.scaling * (x @ w.lora_A.t()) @ w.lora_B.t()


def test_qkv_with_a_frozen_adapter_and_a_plain_projection(device):
    """Q trains its LoRA, K's LoRA is frozen (its ``dxa A`` still reaches ``dx``, it gets no grads),
    V is a plain linear: the side-by-side ``dxa`` and stacked ``A`` keep each projection's part."""
    q, k = _direct_weights(device, 33, 47, 5), _direct_weights(device, 33, 13, 7)
    k.lora_A.requires_grad_(False)
    k.lora_B.requires_grad_(False)
    v = _direct_weights(device, 33, 13, 3)._replace(lora_A=None, lora_B=None)
    x = torch.randn(3, 11, 33, device=device, requires_grad=True)
    dys = [torch.randn(3, 11, n, device=device) for n in (47, 13, 13)]
    expected = (_reference_linear(x, q), _reference_linear(x, k), F.linear(x, v.base, v.bias))
    expected_grads = torch.autograd.grad(expected, (x, q.lora_A, q.lora_B), dys)
    outputs = lora_kernels.lora_qkv(x, q, k, v)
    actual_grads = torch.autograd.grad(outputs, (x, q.lora_A, q.lora_B), dys)
    for actual, want in zip((*outputs, *actual_grads), (*expected, *expected_grads)):
        torch.testing.assert_close(actual, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("leading", [(11,), (2, 3, 5)])
def test_lora_linear_odd_shapes_and_grad_accumulation(leading, device):
    w = _direct_weights(device, 33, 47, 5)
    x = torch.randn(*leading, 33, device=device, requires_grad=True)
    dy = torch.randn(*leading, 47, device=device)
    expected = _reference_linear(x, w)
    expected_grads = torch.autograd.grad(expected, (x, w.lora_A, w.lora_B), dy)
    for _ in range(2):  # .grad accumulates over two backward passes
        y = lora_linear(x, w)
        y.backward(dy)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    for actual, want in zip((x.grad, w.lora_A.grad, w.lora_B.grad), expected_grads):
        torch.testing.assert_close(actual, 2 * want, rtol=1e-4, atol=1e-4)


def test_lora_mlp_saves_gate_and_up_but_not_h(device):
    gate, up = _direct_weights(device, 40, 91, 3, bias=False), _direct_weights(device, 40, 91, 3, bias=False)
    down = _direct_weights(device, 91, 40, 3, bias=False)
    x = torch.randn(13, 40, device=device, requires_grad=True)
    saved_shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_shapes.append(tuple(t.shape)) or t, lambda t: t):
        y = lora_mlp(x, gate, up, down, "gelu_pytorch_tanh")
    assert saved_shapes.count((13, 91)) == 2  # g and u; h = act(g) * u is recomputed
    reference = _reference_linear(F.gelu(_reference_linear(x, gate), approximate="tanh") * _reference_linear(x, up), down)
    torch.testing.assert_close(y, reference, rtol=1e-4, atol=1e-4)
    dy = torch.randn_like(y)
    expected = torch.autograd.grad(reference, (x, *gate[3:5], *up[3:5], *down[3:5]), dy)
    actual = torch.autograd.grad(y, (x, *gate[3:5], *up[3:5], *down[3:5]), dy)
    for a, e in zip(actual, expected):
        assert _rel_error(a, e) < 1e-4


def test_lora_mlp_refuses_second_backward(device):
    w = [_direct_weights(device, 16, 24, 2), _direct_weights(device, 16, 24, 2), _direct_weights(device, 24, 16, 2)]
    x = torch.randn(5, 16, device=device, requires_grad=True)
    y = lora_mlp(x, *w, "silu").sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run twice"):
        y.backward()


def test_lora_mlp_rejects_unknown_activation(device):
    w = [_direct_weights(device, 16, 24, 2), _direct_weights(device, 16, 24, 2), _direct_weights(device, 24, 16, 2)]
    with pytest.raises(ValueError, match="unsupported GLU activation 'relu'"):
        lora_mlp(torch.randn(5, 16, device=device), *w, "relu")


def test_lora_mlp_without_triton_composes_lora_linears(monkeypatch, device):
    model, layer = lora_llama(device)
    monkeypatch.setattr(lora_kernels, "triton_enabled", lambda *tensors: False)
    x = torch.randn(2, 3, LORA_HIDDEN, device=device)
    _assert_matches(make_fused_mlp(layer.mlp, "silu"), layer.mlp, layer.mlp, x, 1e-4)


def test_fused_mlp_under_autocast(device):
    model, layer = lora_llama(device)
    fused = make_fused_mlp(layer.mlp, "silu")
    x = torch.randn(2, 5, LORA_HIDDEN, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        expected, actual = layer.mlp(x), fused(x)
    assert actual.dtype == expected.dtype == torch.bfloat16
    assert _rel_error(actual, expected) < 1e-2


def test_qlora_nf4_double_quant_base(device):
    class TinyMLP(nn.Module):
        def __init__(self):
            super().__init__()
            for name, (n_in, n_out) in dict(gate_proj=(40, 91), up_proj=(40, 91), down_proj=(91, 40)).items():
                setattr(self, name, bnb.nn.Linear4bit(n_in, n_out, bias=False, quant_type="nf4",
                                                      compress_statistics=True, compute_dtype=torch.float32))

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    mlp = TinyMLP()
    for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        proj.weight = proj.weight._quantize("cpu") if device == "cpu" else proj.weight.to(device)
    mlp = mlp.to(device)
    model = get_peft_model(mlp, LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                                           init_lora_weights=False))
    peft_mlp = model.base_model.model
    weights = projection_plan(peft_mlp.gate_proj).weights()
    assert weights.quant_state is not None and weights.quant_state.nested
    fused = make_fused_mlp(peft_mlp, "silu")
    x = torch.randn(3, 7, 40, device=device)
    _assert_matches(fused, peft_mlp, peft_mlp, x, 1e-4)


@pytest.mark.parametrize(
    "lora_kwargs",
    [dict(lora_dropout=0.1), dict(use_dora=True), dict(lora_bias=True)],
    ids=["dropout", "dora", "lora_bias"],
)
def test_not_fusable_configs_give_none(lora_kwargs, device):
    model, layer = lora_llama(device, **lora_kwargs)
    assert projection_plan(layer.mlp.gate_proj) is None
    assert make_fused_mlp(layer.mlp, "silu") is None
    assert make_fused_qkv(layer.self_attn) is None
    assert make_fused_o(layer.self_attn) is None


def test_two_active_adapters_merged_and_trainable_base_give_none(device):
    model, layer = lora_llama(device)
    assert make_fused_qkv(layer.self_attn) is not None
    model.add_adapter("second", LoraConfig(r=4, target_modules="all-linear"))
    model.base_model.set_adapter(["default", "second"])
    assert projection_plan(layer.self_attn.q_proj) is None and make_fused_qkv(layer.self_attn) is None

    model, layer = lora_llama(device)
    layer.mlp.down_proj.merge()
    assert projection_plan(layer.mlp.down_proj) is None and make_fused_mlp(layer.mlp, "silu") is None

    layer.self_attn.o_proj.base_layer.weight.requires_grad_(True)
    assert make_fused_o(layer.self_attn) is None
    assert projection_plan(nn.Conv1d(3, 3, 1)) is None


def test_plans_read_tensors_at_call_time(device):
    model, layer = lora_llama(device)
    attn = layer.self_attn
    fused_o = make_fused_o(attn)
    x = torch.randn(2, 5, LORA_HIDDEN, device=device)
    with torch.no_grad():
        before = fused_o(x)
        attn.o_proj.scaling["default"] *= 3.0
        attn.o_proj.lora_B["default"].weight.add_(0.5)
        assert _rel_error(fused_o(x), before) > 1e-2
        assert _rel_error(fused_o(x), attn.o_proj(x)) < 1e-5


def test_patched_modules_follow_adapter_changes(device):
    """Outside a forward pass of the stack a patched MLP decides at each call, like PEFT."""
    model, layer = lora_llama(device)
    patch_model(model)
    mlp = layer.mlp
    x = torch.randn(2, 5, LORA_HIDDEN, device=device)
    hf_forward = lambda: type(mlp).forward(mlp, x)  # noqa: E731 - the class forward runs PEFT's modules
    with torch.no_grad():
        assert _rel_error(mlp(x), hf_forward()) < 1e-5
        with model.disable_adapter():  # base projections only, like PEFT
            assert projection_plan(mlp.up_proj).weights().lora_A is None
            assert _rel_error(mlp(x), hf_forward()) < 1e-5
        mlp.up_proj.merge()  # no longer fusable: PEFT's own forwards
        assert _rel_error(mlp(x), hf_forward()) < 1e-5


def test_fusability_decided_once_per_forward_pass(monkeypatch, device):
    """One decision per (module, projection group) per pass, reused by the checkpoint
    recomputation in backward; a change between passes (disabling adapters) is honoured."""
    from lightning_fastft.patching import model as patching_model
    from lightning_fastft.training.checkpointing import apply_activation_checkpointing

    model, _ = lora_llama(device)
    reference = copy.deepcopy(model)
    patch_model(model)
    apply_activation_checkpointing(model, "recompute")
    decisions = []
    real = patching_model.projection_plans
    monkeypatch.setattr(patching_model, "projection_plans", lambda *a: decisions.append(a) or real(*a))
    ids = torch.randint(0, LORA_VOCAB, (2, 9), device=device)
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(decisions) == 2 * 3  # 2 layers x (qkv, o, mlp), none in the recomputation
    with torch.no_grad(), model.disable_adapter(), reference.disable_adapter():
        patched_logits = model(input_ids=ids).logits
        assert _rel_error(patched_logits, reference(input_ids=ids).logits) < 1e-5
    assert len(decisions) == 4 * 3
