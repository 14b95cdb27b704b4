import importlib
import warnings

import pytest
import torch
from helpers import assert_norm_relative_close
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lightning_fastft import _runtime
from lightning_fastft.kernels.rms_norm import rms_norm, rms_norm_reference

rms_norm_module = importlib.import_module("lightning_fastft.kernels.rms_norm")  # the package exports a function `rms_norm`

STYLES = {"llama": (0.0, "llama"), "gemma": (1.0, "gemma")}


def random_weight(hidden: int, style: str, dtype: torch.dtype, device: str) -> torch.Tensor:
    centre = 1.0 if style == "llama" else 0.0  # Gemma stores w - 1
    return (centre + 0.2 * torch.randn(hidden, device=device)).to(dtype)


def run_with_grads(fn, x, weight, grad):
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    y = fn(x, weight)
    y.backward(grad)
    return y.detach(), x.grad, weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("style", ["llama", "gemma"])
@pytest.mark.parametrize("shape", [(3, 5, 96), (7, 4095), (2, 3, 128), (3, 14336), (5, 61, 48)])
def test_forward_backward_match_reference(shape, style, dtype, device):
    offset, casting = STYLES[style]
    x = torch.randn(shape, device=device).mul(3.0).to(dtype)
    weight = random_weight(shape[-1], style, dtype, device)
    grad = torch.randn(shape, device=device).to(dtype)
    got = run_with_grads(lambda x, w: rms_norm(x, w, 1e-6, offset, casting), x, weight, grad)
    want = run_with_grads(lambda x, w: rms_norm_reference(x, w, 1e-6, offset, casting), x, weight, grad)
    for actual, expected in zip(got, want):
        assert_norm_relative_close(actual, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_matches_hugging_face_modules(style, dtype, device):
    hidden, eps = 96, 1e-5
    offset, casting = STYLES[style]
    module = (LlamaRMSNorm(hidden, eps) if style == "llama" else GemmaRMSNorm(hidden, eps)).to(device, dtype)
    with torch.no_grad():
        module.weight.copy_(random_weight(hidden, style, dtype, device))
    x = torch.randn(5, 3, hidden, device=device).to(dtype)
    grad = torch.randn(5, 3, hidden, device=device).to(dtype)
    got = run_with_grads(lambda x, w: rms_norm(x, w, eps, offset, casting), x, module.weight, grad)

    x_hf = x.clone().requires_grad_()
    y_hf = module(x_hf)
    y_hf.backward(grad)
    want = (y_hf.detach(), x_hf.grad, module.weight.grad)
    for actual, expected in zip(got, want):
        assert_norm_relative_close(actual, expected, dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_llama_casting_rounds_before_the_weight(device):
    """bf16 x with an fp32 weight: HF rounds x_hat to bf16, then multiplies in fp32.

    Exact on CUDA; the Triton interpreter truncates fp32 -> bf16 instead of rounding to
    nearest even, so on CPU only bf16-level agreement can be asked for.
    """
    x = torch.randn(9, 96, device=device).to(torch.bfloat16)
    weight = random_weight(96, "llama", torch.float32, device)
    module = LlamaRMSNorm(96, 1e-6).to(device)
    with torch.no_grad():
        module.weight.copy_(weight)
    y = rms_norm(x, weight, 1e-6)
    assert y.dtype == torch.float32
    tolerance = 1e-5 if device == "cuda" else 1e-2
    torch.testing.assert_close(y, module(x), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_frozen_weight_gets_no_grad(dtype, device):
    x = torch.randn(6, 7, 96, device=device).to(dtype).requires_grad_()
    weight = random_weight(96, "llama", dtype, device)
    grad = torch.randn(6, 7, 96, device=device).to(dtype)
    rms_norm(x, weight, 1e-6).backward(grad)
    _, want_dx, _ = run_with_grads(lambda x, w: rms_norm_reference(x, w, 1e-6), x, weight, grad)
    assert weight.grad is None
    assert_norm_relative_close(x.grad, want_dx, dtype)


@pytest.mark.parametrize("layout", ["transposed", "row_slice", "strided_rows"])
def test_non_contiguous_input_and_grad(layout, device):
    hidden = 96
    if layout == "transposed":  # hidden dim not contiguous: copied
        x = torch.randn(2, hidden, 11, device=device).transpose(1, 2)
    elif layout == "row_slice":  # row stride > hidden: used as a view
        x = torch.randn(2, 11, 2 * hidden, device=device)[..., :hidden]
    else:  # every other token
        x = torch.randn(2, 22, hidden, device=device)[:, ::2]
    assert not x.is_contiguous()
    weight = random_weight(hidden, "llama", torch.float32, device)
    grad = torch.randn(2, hidden, 11, device=device).transpose(1, 2)
    got = run_with_grads(lambda x, w: rms_norm(x, w, 1e-6), x, weight, grad)
    want = run_with_grads(lambda x, w: rms_norm_reference(x, w, 1e-6), x, weight, grad)
    for actual, expected in zip(got, want):
        assert_norm_relative_close(actual, expected, torch.float32)


def test_empty_input(device):
    x = torch.randn(0, 96, device=device, requires_grad=True)
    weight = random_weight(96, "llama", torch.float32, device).requires_grad_()
    y = rms_norm(x, weight, 1e-6)
    y.sum().backward()
    assert y.shape == (0, 96) and torch.equal(weight.grad, torch.zeros_like(weight))


def test_rejects_bad_arguments(device):
    x = torch.randn(4, 96, device=device)
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(x, torch.randn(95, device=device), 1e-6)
    with pytest.raises(ValueError, match="casting"):
        rms_norm(x, torch.randn(96, device=device), 1e-6, casting="mistral")


@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_fallback_matches_and_warns_once(style, device, monkeypatch):
    offset, casting = STYLES[style]
    x = torch.randn(5, 4095, device=device)
    weight = random_weight(4095, style, torch.float32, device)
    grad = torch.randn(5, 4095, device=device)
    kernel = run_with_grads(lambda x, w: rms_norm(x, w, 1e-6, offset, casting), x, weight, grad)

    monkeypatch.setattr(rms_norm_module, "triton_enabled", lambda *tensors: False)
    monkeypatch.setattr(_runtime, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = run_with_grads(lambda x, w: rms_norm(x, w, 1e-6, offset, casting), x, weight, grad)
        run_with_grads(lambda x, w: rms_norm(x, w, 1e-6, offset, casting), x, weight, grad)
    assert [str(w.message).count("rms_norm") for w in caught] == [1]
    for actual, expected in zip(fallback, kernel):
        assert_norm_relative_close(actual, expected, torch.float32)
