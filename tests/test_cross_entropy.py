"""Fused linear cross-entropy against the materialised-logits reference and HF's ForCausalLMLoss."""

import re

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from helpers import assert_max_relative_close

from lightning_fastft import _runtime
from lightning_fastft.kernels import cross_entropy as ce_module
from lightning_fastft.kernels.cross_entropy import (
    causal_lm_loss,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
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
    reference = fused_linear_cross_entropy_reference(hidden, weight, target, bias=bias, **reference_kwargs)
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
    """The (hidden, weight, bias) gradient flags of every later ``fused_linear_cross_entropy_forward`` call."""
    requested = []
    chunked = ce_module.fused_linear_cross_entropy_forward

    def spy(*args):
        requested.append(args[8:11])
        return chunked(*args)

    monkeypatch.setattr(ce_module, "fused_linear_cross_entropy_forward", spy)
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
    reference = fused_linear_cross_entropy_reference(hidden, weight, target)
    assert_max_relative_close(loss, reference.detach(), torch.float32)


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
    reference = fused_linear_cross_entropy_reference(hidden.bfloat16(), weight.bfloat16(), target)
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


@triton.jit
def _tanh_kernel(x_ptr, t_ptr, dt_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    t, dt = ce_module._tanh_and_derivative(tl.load(x_ptr + offsets, mask=mask, other=1.0))
    tl.store(t_ptr + offsets, t, mask=mask)
    tl.store(dt_ptr + offsets, dt, mask=mask)


def test_softcap_tanh_is_accurate(device):
    """The kernel's tanh on every 61st fp32 in +-[2^-13, 10] (both branches, the switch at 0.625
    and saturation) against fp64: within 3 ulp (1.9 measured; 2 sigmoid(2x) - 1: over 10^4), and
    1 - tanh^2 within 2e-6 relative (1.1e-6 measured on GPU, 3.6e-7 in the interpreter)."""
    low, high = torch.tensor([2.0**-13, 10.0]).view(torch.int32).tolist()
    x = torch.arange(low, high, 61, dtype=torch.int32, device=device).view(torch.float32)
    x = torch.cat([x, -x])
    t, dt = torch.empty_like(x), torch.empty_like(x)
    _tanh_kernel[(triton.cdiv(x.numel(), 2**16),)](x, t, dt, x.numel(), BLOCK=2**16)
    reference = torch.tanh(x.double())
    ulp = torch.nextafter(reference.abs().float(), torch.tensor(2.0, device=device)) - reference.abs().float()
    assert ((t.double() - reference).abs() / ulp.double()).max() <= 3.0
    reference_dt = torch.cosh(x.double()) ** -2
    assert ((dt.double() - reference_dt).abs() / reference_dt).max() <= 2e-6


def dyadic(shape, bits, device):
    """Random nonzero multiples of 2^-bits in (-1, 1): short dot products of them are exact in fp32."""
    signs = torch.randint(0, 2, shape, device=device) * 2 - 1
    return (torch.randint(1, 2**bits, shape, device=device) * signs).float() / 2**bits


def test_softcap_matches_fp64_tanh(device):
    """Cap 30 against fp64 ``torch.tanh`` on exact fp32 logits (dyadic inputs, |z| < 3.5). The bias
    gradient is the column sum of d loss / d z, positive off the targets, so its elementwise error
    is the kernel's: 4e-7 here, 2e-6 to 5e-6 with tanh = 2 sigmoid(2x) - 1. Hidden and weight
    gradients are dominated by the fp32 matmuls' own rounding."""
    n_tokens, hidden_size, vocab = 7, 33, 32003
    hidden = dyadic((n_tokens, hidden_size), 6, device).requires_grad_()
    weight = (dyadic((vocab, hidden_size), 10, device) / 4).requires_grad_()
    bias = dyadic((vocab,), 10, device).requires_grad_()
    target = torch.randint(0, vocab, (n_tokens,), device=device)
    loss = fused_linear_cross_entropy(hidden, weight, target, bias=bias, softcap=30.0, chunk_size=3)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))

    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    logits = torch.addmm(leaves[2], leaves[0], leaves[1].t())
    assert torch.equal(torch.addmm(bias, hidden, weight.t()).double(), logits)  # fp32 logits are exact
    reference = F.cross_entropy(30.0 * torch.tanh(logits / 30.0), target)
    reference_grads = torch.autograd.grad(reference, leaves)

    assert abs(loss.item() - reference.item()) <= 3e-7 * reference.item()
    grad_bias_error = ((grads[2].double() - reference_grads[2]).abs() / reference_grads[2].abs()).max()
    assert grad_bias_error <= 1e-6, f"bias gradient elementwise relative error {grad_bias_error:.3g}"
    for grad, reference_grad in zip(grads[:2], reference_grads[:2]):
        assert_max_relative_close(grad, reference_grad.float(), torch.float32)


@pytest.mark.parametrize("use_triton", [True, False])
@pytest.mark.parametrize("bad", [1001, 5000, -1, -7])
def test_out_of_range_target_raises(device, monkeypatch, use_triton, bad):
    if not use_triton:
        monkeypatch.setattr(ce_module, "triton_enabled", lambda *tensors: False)
    hidden, weight, _, target = make_inputs(device, 13, 32, 1001, torch.float32, ignored=(2,))
    target[9] = bad
    target[11] = 1001 - bad  # also bad for bad >= 1001, valid for bad < 0; only the first is named
    message = re.escape(f"target[9] = {bad} is not a class index") + r".* 1001 .*ignore_index=-100"
    with pytest.raises(ValueError, match=message):
        fused_linear_cross_entropy(hidden, weight, target, chunk_size=4)
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        fused_linear_cross_entropy(hidden, weight, target, chunk_size=4)


def test_other_ignore_index_is_checked(device):
    hidden, weight, _, target = make_inputs(device, 9, 32, 100, torch.float32)
    target[3] = -1
    check_against_reference(hidden, weight, None, target, torch.float32, ignore_index=-1, chunk_size=4)
    target[6] = -100
    with pytest.raises(ValueError, match=re.escape("target[6] = -100") + ".*ignore_index=-1"):
        fused_linear_cross_entropy(hidden, weight, target, ignore_index=-1)


def test_kernel_masks_out_of_range_target(device):
    """Even unchecked, the kernel never reads outside a row: such a row's loss is NaN."""
    logits = torch.randn(4, 37, device=device)
    target = torch.tensor([3, 37, -5, 36], device=device)
    loss = torch.empty(4, device=device)
    scale = torch.ones((), device=device)
    ce_module._rows_loss_and_grad_triton(logits, target, loss, scale, -100, None, False)
    assert loss[[1, 2]].isnan().all() and loss[[0, 3]].isfinite().all()


@pytest.mark.parametrize("use_triton", [True, False])
@pytest.mark.parametrize("pre_shifted", [False, True])
@pytest.mark.parametrize("bad", [1001, -3])
def test_causal_lm_loss_rejects_out_of_range_labels(device, monkeypatch, use_triton, pre_shifted, bad):
    if not use_triton:
        monkeypatch.setattr(ce_module, "triton_enabled", lambda *tensors: False)
    hidden = torch.randn(2, 9, 32, device=device, requires_grad=True)
    weight = torch.randn(1001, 32, device=device, requires_grad=True)
    labels = torch.randint(0, 1001, (2, 9), device=device)
    labels[0, 0] = bad  # never a target (nothing predicts the first token): not an error
    labels[1, 5] = bad
    if pre_shifted:
        kwargs, named = {"shift_labels": shift_labels(labels)}, f"shift_labels[1, 4] = {bad}"
        labels = None
    else:
        kwargs, named = {}, f"labels[1, 5] = {bad}"
    with pytest.raises(ValueError, match=re.escape(named) + r".* 1001 .*ignore_index=-100"):
        causal_lm_loss(hidden, weight, labels, chunk_size=4, **kwargs)
