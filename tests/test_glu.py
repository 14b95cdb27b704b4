"""SwiGLU / GeGLU Triton kernels against the PyTorch reference and Hugging Face's activations."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCE, assert_close_scaled, assert_max_relative_close

from lightning_fastft import _runtime
from lightning_fastft.kernels._launch import MAX_BLOCK, LaunchPolicy
from lightning_fastft.kernels.glu import (
    ACTIVATIONS,
    geglu,
    glu,
    glu_backward,
    glu_backward_weighted,
    glu_forward,
    glu_reference,
    swiglu,
)

glu_module = importlib.import_module("lightning_fastft.kernels.glu")  # the package exports a function `glu`

def reference_grads(gate, up, dh, activation):
    gate_ref = gate.detach().clone().requires_grad_()
    up_ref = up.detach().clone().requires_grad_()
    h_ref = glu_reference(gate_ref, up_ref, activation)
    h_ref.backward(dh)
    return h_ref.detach(), gate_ref.grad, up_ref.grad


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_matches_hugging_face_activation(activation):
    from transformers.activations import ACT2FN

    gate, up = torch.randn(5, 33), torch.randn(5, 33)
    assert torch.allclose(glu_reference(gate, up, activation), ACT2FN[activation](gate) * up, atol=1e-6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 37), (2, 3, 4095), (2, 14336), (3, 11008)])
def test_glu_forward_backward(device, activation, dtype, shape):
    gate = (2 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    up = torch.randn(shape, device=device, dtype=dtype).requires_grad_()
    dh = torch.randn(shape, device=device, dtype=dtype)
    h = glu(gate, up, activation)
    h.backward(dh)
    h_ref, dgate_ref, dup_ref = reference_grads(gate, up, dh, activation)
    assert_max_relative_close(h, h_ref, dtype)
    assert_max_relative_close(gate.grad, dgate_ref, dtype)
    assert_max_relative_close(up.grad, dup_ref, dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_glu_on_halves_of_fused_projection(device, activation):
    """Gate and up as strided views of one (tokens, 2 * I) projection, I odd."""
    width = 1001
    fused = torch.randn(2, 7, 2 * width, device=device, requires_grad=True)
    gate, up = fused[..., :width], fused[..., width:]
    dh = torch.randn(2, 7, width, device=device)
    h = glu(gate, up, activation)
    h.backward(dh)
    h_ref, dgate_ref, dup_ref = reference_grads(gate, up, dh, activation)
    assert_max_relative_close(h, h_ref, torch.float32)
    assert_max_relative_close(fused.grad, torch.cat([dgate_ref, dup_ref], dim=-1), torch.float32)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_writes_into_inputs(device, activation, dtype):
    gate = torch.randn(9, 515, device=device, dtype=dtype)
    up = torch.randn(9, 515, device=device, dtype=dtype)
    dh = torch.randn(9, 515, device=device, dtype=dtype)
    h_ref, dgate_ref, dup_ref = reference_grads(gate, up, dh, activation)
    pointers = gate.data_ptr(), up.data_ptr(), dh.data_ptr()

    h, dgate, dup = glu_backward(dh, gate, up, activation, inplace=True, return_h=True)

    assert (dgate.data_ptr(), dup.data_ptr(), h.data_ptr()) == pointers
    assert_max_relative_close(dgate, dgate_ref, dtype)
    assert_max_relative_close(dup, dup_ref, dtype)
    assert_max_relative_close(h, h_ref, dtype)


def test_backward_into_halves_of_one_buffer(device):
    """``out=`` writes dgate and dup into given tensors: here the halves of one (rows, 2I) buffer,
    as the MoE experts' backward reads the gate/up gradient whole."""
    gate, up, dh = (torch.randn(5, 37, device=device) for _ in range(3))
    buffer = torch.full((5, 74), float("nan"), device=device)
    h, dgate, dup = glu_backward(dh, gate, up, "silu", out=(buffer[:, :37], buffer[:, 37:]), return_h=True)
    h_ref, dgate_ref, dup_ref = reference_grads(gate, up, dh, "silu")
    assert dgate.data_ptr() == buffer.data_ptr() and dup.data_ptr() == buffer[:, 37:].data_ptr()
    assert_max_relative_close(buffer, torch.cat([dgate_ref, dup_ref], dim=1), torch.float32)
    assert_max_relative_close(h, h_ref, torch.float32)
    with pytest.raises(ValueError, match="takes no out tensors"):
        glu_backward(dh, gate, up, "silu", inplace=True, out=(buffer[:, :37], buffer[:, 37:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_weighted_backward_matches_scaled_rows_reference(device, activation, dtype, monkeypatch):
    """For rows y_s = c_s * act(g_s) * u_s (mixture-of-experts rows and their routing weights):
    the gradients of g and u for c_s * dh_s, h, and dc_s = <dh_s, h_s>, against fp64, written into
    the strided halves of one (rows, 2I) buffer; with the block capped at 512, 1500 columns take a
    program three blocks and a masked tail (as Mixtral's 14336 do under the 4096 cap)."""
    for rows, cols, max_block in ((7, 37, MAX_BLOCK), (3, 1500, 512)):
        monkeypatch.setattr(glu_module, "_LAUNCH", LaunchPolicy(max_block=max_block))
        u = torch.randn(rows, 2 * cols, device=device).to(dtype)
        dh, weights = torch.randn(rows, cols, device=device).to(dtype), torch.rand(rows, device=device)
        buffer = torch.full((rows, 2 * cols), float("nan"), device=device, dtype=dtype)
        halves = (buffer[:, :cols], buffer[:, cols:])
        h, dc = glu_backward_weighted(dh, u[:, :cols], u[:, cols:], weights, activation, out=halves)
        gate64, up64 = (t.double().requires_grad_() for t in (u[:, :cols], u[:, cols:]))
        h64 = glu_reference(gate64, up64, activation)
        scaled_dh = dh * weights.to(dtype)[:, None]  # c_s dh_s rounded to dh's dtype, as HF's multiply
        h64.backward(scaled_dh.double())
        rtol = 2 * TOLERANCE[dtype]  # two roundings in a row: c_s dh_s, then the gradient
        assert_close_scaled(h.double(), h64.detach(), rtol)
        assert_close_scaled(buffer.double(), torch.cat([gate64.grad, up64.grad], dim=1), rtol)
        dc64 = (dh.double() * h64.detach().to(dtype).double()).sum(1)  # <dh_s, h_s>, h as stored
        assert dc.dtype == torch.float32
        assert_close_scaled(dc.double(), dc64, rtol)
    with pytest.raises(ValueError, match="unit column stride"):
        glu_backward_weighted(dh, u[:, :cols].t(), u[:, cols:], weights, activation, out=halves)


def test_out_of_place_launchers_leave_inputs_intact(device):
    gate, up, dh = (torch.randn(4, 130, device=device) for _ in range(3))
    saved = [t.clone() for t in (gate, up, dh)]
    h = glu_forward(gate, up, "silu")
    dgate, dup = glu_backward(dh, gate, up, "silu")
    h_ref, dgate_ref, dup_ref = reference_grads(gate, up, dh, "silu")
    for tensor, copy in zip((gate, up, dh), saved):
        assert torch.equal(tensor, copy)
    assert_max_relative_close(h, h_ref, torch.float32)
    assert_max_relative_close(dgate, dgate_ref, torch.float32)
    assert_max_relative_close(dup, dup_ref, torch.float32)


def test_named_wrappers(device):
    gate, up = torch.randn(3, 77, device=device), torch.randn(3, 77, device=device)
    assert_max_relative_close(swiglu(gate, up), glu_reference(gate, up, "silu"), torch.float32)
    assert_max_relative_close(geglu(gate, up), glu_reference(gate, up, "gelu_pytorch_tanh"), torch.float32)
    assert_max_relative_close(geglu(gate, up, approximate="none"), glu_reference(gate, up, "gelu"), torch.float32)
    with pytest.raises(ValueError):
        geglu(gate, up, approximate="erf")
    with pytest.raises(ValueError):
        glu(gate, up, "relu")


def test_fallback_warns_and_matches_kernel(device, monkeypatch):
    gate = torch.randn(5, 31, device=device, requires_grad=True)
    up = torch.randn(5, 31, device=device, requires_grad=True)
    dh = torch.randn(5, 31, device=device)
    h_kernel = glu(gate, up, "gelu")
    dgate_kernel, dup_kernel = torch.autograd.grad(h_kernel, (gate, up), dh)

    monkeypatch.setattr(glu_module, "triton_enabled", lambda *tensors: False)
    monkeypatch.setattr(_runtime, "_warned", set())
    with pytest.warns(UserWarning, match="glu runs its PyTorch reference"):
        h = glu(gate, up, "gelu")
    h.backward(dh)
    h_ref, dgate_ref, dup_ref = reference_grads(gate, up, dh, "gelu")
    assert torch.equal(h, h_ref)
    assert_max_relative_close(gate.grad, dgate_ref, torch.float32)
    assert_max_relative_close(up.grad, dup_ref, torch.float32)
    for fallback, kernel in ((h, h_kernel), (gate.grad, dgate_kernel), (up.grad, dup_kernel)):
        assert_max_relative_close(fallback.detach(), kernel.detach(), torch.float32)


def test_gelu_tanh_matches_fp64_elementwise(device):
    """``gelu_pytorch_tanh`` against fp64 ``torch.tanh``, element by element, for gate in
    [-4.5, 4.5] (where fp64's own ``1 + tanh`` is still exact enough). ``h`` and ``dup`` within
    1e-5 relative, ``dgate`` within 1e-5 of ``|dh * up| * (|s| + |q|)`` for gelu' = s + q (the sum's
    own condition). Forming tanh = 2 sigmoid(2y) - 1 first was 1e-2 off where ``1 + tanh`` is tiny."""
    shape = (5, 2001)
    gate = (torch.rand(shape, device=device) * 9 - 4.5).requires_grad_()
    assert gate.ne(0).all()
    up = torch.randn(shape, device=device, requires_grad=True)
    dh = torch.randn(shape, device=device)
    h = glu(gate, up, "gelu_pytorch_tanh")
    dgate, dup = torch.autograd.grad(h, (gate, up), dh)

    g, u, dh64 = gate.detach().double(), up.detach().double(), dh.double()
    t = torch.tanh(0.7978845608028654 * (g + 0.044715 * g**3))
    s, q = 0.5 * (1 + t), 0.5 * g * (1 - t * t) * 0.7978845608028654 * (1 + 3 * 0.044715 * g * g)
    h_ref = F.gelu(g, approximate="tanh") * u
    for actual, expected, scale in (
        (h, h_ref, h_ref.abs()),
        (dup, dh64 * F.gelu(g, approximate="tanh"), (dh64 * F.gelu(g, approximate="tanh")).abs()),
        (dgate, dh64 * u * (s + q), (dh64 * u).abs() * (s.abs() + q.abs())),
    ):
        error = ((actual.double() - expected).abs() / scale).max()
        assert error <= 1e-5, f"elementwise relative error {error:.3g}"
