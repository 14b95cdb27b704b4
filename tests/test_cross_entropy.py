"""Fused linear cross-entropy against the materialised-logits reference and HF's ForCausalLMLoss."""

import pytest
import torch
from helpers import assert_max_relative_close

from lightning_fastft import _runtime
from lightning_fastft.kernels import cross_entropy as ce_module
from lightning_fastft.kernels.cross_entropy import (
    causal_lm_loss,
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
    shift_labels,
)

def make_inputs(device, n_tokens, hidden_size, vocab, dtype, with_bias=False, ignored=()):
    hidden = torch.randn(n_tokens, hidden_size, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).to(dtype).requires_grad_()
    bias = torch.randn(vocab, device=device).to(dtype).requires_grad_() if with_bias else None
    target = torch.randint(0, vocab, (n_tokens,), device=device)
    target[list(ignored)] = -100
    return hidden, weight, bias, target


def check_against_reference(hidden, weight, bias, target, dtype, grad_output=1.7, **kwargs):
    """Loss and every requested gradient of the fused op vs the fp32 reference."""
    leaves = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    loss = fused_linear_cross_entropy(hidden, weight, target, bias=bias, **kwargs)
    grads = torch.autograd.grad(loss * grad_output, leaves)
    reference_kwargs = {k: v for k, v in kwargs.items() if k != "chunk_size"}
    reference = linear_cross_entropy_reference(hidden, weight, target, bias=bias, **reference_kwargs)
    reference_grads = torch.autograd.grad(reference * grad_output, leaves)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_max_relative_close(loss, reference, dtype)
    for grad, reference_grad in zip(grads, reference_grads):
        assert_max_relative_close(grad, reference_grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "n_tokens, hidden_size, vocab, chunk_size",
    [(37, 96, 1001, 8), (45, 257, 32003, 16), (19, 64, 500, None)],
)
def test_matches_reference(device, dtype, n_tokens, hidden_size, vocab, chunk_size):
    inputs = make_inputs(device, n_tokens, hidden_size, vocab, dtype, ignored=(0, 5, 6, n_tokens - 1))
    check_against_reference(*inputs, dtype, chunk_size=chunk_size)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_bias_softcap_and_reduction(device, reduction, softcap):
    inputs = make_inputs(device, 29, 96, 1001, torch.float32, with_bias=True, ignored=(3, 4, 17))
    check_against_reference(*inputs, torch.float32, reduction=reduction, softcap=softcap, chunk_size=7)


def test_softcap_bf16(device):
    hidden, weight, bias, target = make_inputs(device, 33, 96, 1001, torch.bfloat16, ignored=(1,))
    with torch.no_grad():
        weight *= 8  # logits beyond the cap, where the cap's derivative matters
    check_against_reference(hidden, weight, bias, target, torch.bfloat16, softcap=3.0, chunk_size=10)


def test_sum_is_mean_times_valid_count(device):
    hidden, weight, _, target = make_inputs(device, 40, 64, 333, torch.float32, ignored=range(0, 40, 3))
    total = fused_linear_cross_entropy(hidden, weight, target, reduction="sum", chunk_size=9)
    mean = fused_linear_cross_entropy(hidden, weight, target, reduction="mean", chunk_size=9)
    valid = (target != -100).sum()
    assert_max_relative_close(total, mean * valid, torch.float32)


def test_fully_ignored_chunks(device):
    ignored = list(range(0, 16)) + [30, 31]
    inputs = make_inputs(device, 35, 96, 777, torch.float32, ignored=ignored)
    check_against_reference(*inputs, torch.float32, chunk_size=8)
    hidden = inputs[0]
    loss = fused_linear_cross_entropy(*inputs[:2], inputs[3], chunk_size=8)
    (grad_hidden,) = torch.autograd.grad(loss, hidden)
    assert torch.all(grad_hidden[ignored] == 0) and grad_hidden[16:30].abs().sum() > 0


def test_default_chunking_uses_several_chunks(device, monkeypatch):
    vocab = 1001
    monkeypatch.setattr(ce_module, "LOGITS_CHUNK_BYTES", 6 * vocab * 4)  # 6 rows of fp32 logits
    assert ce_module._chunk_rows(37, vocab, 4, None) == 6  # 7 balanced chunks of <= 6 rows
    inputs = make_inputs(device, 37, 96, vocab, torch.float32, ignored=(2, 9))
    check_against_reference(*inputs, torch.float32)


def spy_on_requested_grads(monkeypatch) -> list:
    """The (hidden, weight, bias) gradient flags of every later ``_chunked_loss_and_grads`` call."""
    requested = []
    chunked = ce_module._chunked_loss_and_grads

    def spy(*args):
        requested.append(args[8:11])
        return chunked(*args)

    monkeypatch.setattr(ce_module, "_chunked_loss_and_grads", spy)
    return requested


def test_frozen_weight_skips_weight_gradient(device, monkeypatch):
    hidden, weight, _, target = make_inputs(device, 31, 96, 1001, torch.float32, ignored=(4,))
    weight.requires_grad_(False)
    requested = spy_on_requested_grads(monkeypatch)
    check_against_reference(hidden, weight, None, target, torch.float32, chunk_size=8)
    assert requested == [(True, False, False)]
    assert weight.grad is None


def test_no_grad_computes_loss_only(device, monkeypatch):
    hidden, weight, _, target = make_inputs(device, 21, 64, 500, torch.float32)
    requested = spy_on_requested_grads(monkeypatch)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, target, chunk_size=4)
    assert requested == [(False, False, False)] and not loss.requires_grad
    assert_max_relative_close(loss, linear_cross_entropy_reference(hidden, weight, target).detach(), torch.float32)


def test_second_backward_is_refused(device):
    hidden, weight, _, target = make_inputs(device, 9, 32, 100, torch.float32)
    loss = fused_linear_cross_entropy(hidden, weight, target)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        loss.backward()


def test_fallback_warns_and_matches_reference(device, monkeypatch):
    monkeypatch.setattr(ce_module, "triton_enabled", lambda *tensors: False)
    monkeypatch.setattr(_runtime, "_warned", set())
    hidden, weight, bias, target = make_inputs(device, 23, 96, 1001, torch.float32, True, ignored=range(6))
    inputs = hidden, weight, bias, target.int()
    with pytest.warns(UserWarning, match="fused_linear_cross_entropy runs its PyTorch reference"):
        check_against_reference(*inputs, torch.float32, softcap=4.0, chunk_size=6)


def test_autocast_runs_matmuls_in_autocast_dtype(device):
    hidden, weight, _, target = make_inputs(device, 17, 64, 300, torch.float32)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, target, chunk_size=5)
    loss.backward()
    reference = linear_cross_entropy_reference(hidden.bfloat16(), weight.bfloat16(), target)
    assert_max_relative_close(loss, reference.detach(), torch.bfloat16)
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32


def test_shift_labels():
    labels = torch.tensor([[5, 6, 7, -100], [1, 2, 3, 4]])
    expected = torch.tensor([[6, 7, -100, -100], [2, 3, 4, -100]])
    assert torch.equal(shift_labels(labels), expected)
    assert torch.equal(shift_labels(labels, ignore_index=-1)[:, -1], torch.tensor([-1, -1]))


@pytest.mark.parametrize("num_items_in_batch", [None, 23])
@pytest.mark.parametrize("pre_shifted", [False, True])
def test_causal_lm_loss_matches_hugging_face(device, num_items_in_batch, pre_shifted):
    from transformers.loss.loss_utils import ForCausalLMLoss

    batch, seq, hidden_size, vocab = 3, 11, 96, 1001
    hidden = torch.randn(batch, seq, hidden_size, device=device, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), device=device)
    labels[0, :4] = -100
    labels[2, 7:] = -100
    count = torch.tensor(num_items_in_batch, device=device) if num_items_in_batch else None
    kwargs = {"shift_labels": shift_labels(labels)} if pre_shifted else {}
    given_labels = None if pre_shifted else labels

    loss = causal_lm_loss(hidden, weight, given_labels, num_items_in_batch=count, chunk_size=8, **kwargs)
    grads = torch.autograd.grad(loss, (hidden, weight))
    hf_loss = ForCausalLMLoss(hidden @ weight.t(), given_labels, vocab, num_items_in_batch=count, **kwargs)
    hf_grads = torch.autograd.grad(hf_loss, (hidden, weight))

    assert_max_relative_close(loss, hf_loss, torch.float32)
    for grad, hf_grad in zip(grads, hf_grads):
        assert_max_relative_close(grad, hf_grad, torch.float32)
