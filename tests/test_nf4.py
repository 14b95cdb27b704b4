"""NF4 / FP4 dequantisation against bitsandbytes' own quantize_4bit / dequantize_4bit."""

import warnings

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import pytest
import torch

from lightning_fastft._runtime import triton_interpreting
from lightning_fastft.kernels import nf4

# (129, 257) has > 256 absmax blocks of 64, so double quant spans several state2 blocks;
# 2405 and 33153 elements are odd, so the last packed byte holds a single value.
SHAPES = [(37, 65), (129, 257), (7,)]


def _quantized(shape, dtype, quant_type, compress_statistics, device, blocksize=64):
    weight = (torch.randn(shape, device=device) * 3).to(dtype)
    return bnb_functional.quantize_4bit(
        weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=compress_statistics
    )


def _assert_matches_bnb(out, expected):
    assert out.dtype == expected.dtype and out.shape == expected.shape
    if out.dtype == torch.bfloat16 and out.device.type == "cpu" and triton_interpreting():
        # The Triton interpreter truncates fp32 -> bf16 instead of rounding to nearest (the GPU
        # rounds): allow one bf16 ulp; exactness of the arithmetic is checked in fp32 below.
        torch.testing.assert_close(out.float(), expected.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(out, expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_4bit_matches_bitsandbytes(shape, quant_type, compress_statistics, dtype, device):
    packed, state = _quantized(shape, dtype, quant_type, compress_statistics, device)
    expected = bnb_functional.dequantize_4bit(packed, state)
    _assert_matches_bnb(nf4.dequantize_4bit(packed, state), expected)
    # fp32 output of the same data: exactly bitsandbytes' fp32 arithmetic, rounded like torch.
    exact = nf4.dequantize_4bit(packed, state, torch.float32)
    assert torch.equal(exact.to(dtype), expected)


@pytest.mark.parametrize("blocksize", [128, 256])
def test_dequantize_4bit_other_blocksizes(blocksize, device):
    packed, state = _quantized((33, 71), torch.float32, "nf4", True, device, blocksize=blocksize)
    assert torch.equal(nf4.dequantize_4bit(packed, state), bnb_functional.dequantize_4bit(packed, state))


def test_dequantize_4bit_of_params4bit(device):
    data = torch.randn(48, 90)
    param = bnb.nn.Params4bit(data, requires_grad=False, quant_type="nf4", compress_statistics=True)
    param = param._quantize(device) if device == "cpu" else param.to(device)
    expected = bnb_functional.dequantize_4bit(param.data, param.quant_state)
    out = nf4.dequantize_4bit(param, param.quant_state, torch.float32)
    assert out.shape == (48, 90)
    assert torch.equal(out, expected)
    # and it is an actual 4-bit approximation of the original weight
    assert (out.cpu() - data).abs().max() < 0.5 * data.abs().max()


def test_dequantize_4bit_fallback_warns_and_matches(monkeypatch, device):
    packed, state = _quantized((19, 33), torch.float16, "nf4", True, device)
    kernel = nf4.dequantize_4bit(packed, state, torch.float32)
    monkeypatch.setattr(nf4, "triton_enabled", lambda *tensors: False)
    monkeypatch.setattr("lightning_fastft._runtime._warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = nf4.dequantize_4bit(packed, state, torch.float32)
    assert any("dequantize_4bit" in str(w.message) for w in caught)
    assert out.dtype == torch.float32
    assert torch.equal(out, bnb_functional.dequantize_4bit(packed, state).float())
    assert torch.equal(out, kernel.half().float())  # the fallback rounds to quant_state.dtype first
