"""``add_low_rank_`` (y += s a b^T in place) against an fp64 reference and ``torch.addmm_``."""

import pytest
import torch

from lightning_fastft.kernels.low_rank import MAX_RANK_CHUNK, add_low_rank_, add_low_rank_reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _operands(m, n, rank, dtype, device):
    """A strided ``y`` (a column slice), ``a`` (M, r) and ``b`` (N, r) as LoRA passes them: ``b`` is
    either ``B`` itself or the transposed view ``A^T`` of an (r, N) ``A``."""
    y = torch.randn(m, n + 5, device=device, dtype=dtype)[:, 3 : n + 3]
    a = torch.randn(m, rank, device=device, dtype=dtype)
    b = torch.randn(rank, n, device=device, dtype=dtype).t()
    return y, a, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, rank", [(37, 77, 5), (130, 301, 16), (65, 129, MAX_RANK_CHUNK + 7), (3, 5, 1)])
def test_rounds_the_exact_result_once(m, n, rank, dtype, device):
    """Each element is the fp64 result rounded once to y's dtype, up to the error of the fp32 arithmetic
    before that rounding (a few fp32 ulps of ``|y| + s |a| |b|^T``)."""
    y, a, b = _operands(m, n, rank, dtype, device)
    scale = 0.37
    expected = y.double() + scale * (a.double() @ b.double().t())
    fp32_error = (rank + 4) * 2.0**-24 * (y.double().abs() + scale * (a.double().abs() @ b.double().abs().t()))
    before, pointer = y.clone(), y.data_ptr()
    result = add_low_rank_(y, a, b, scale)
    assert result is y and y.data_ptr() == pointer
    half_ulp = torch.finfo(dtype).eps / 2 * expected.abs()
    assert ((y.double() - expected).abs() <= half_ulp + fp32_error).all()
    assert not torch.equal(y, before)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_equals_addmm_to_rounding(dtype, device):
    y, a, b = _operands(200, 333, 16, dtype, device)
    expected = add_low_rank_reference(y.clone(), a, b, 2.0)
    add_low_rank_(y, a, b, 2.0)
    differing = (y != expected).float().mean().item()
    assert differing < 0.01  # summation order inside the fp32 accumulation may flip a rare tie
    torch.testing.assert_close(y.float(), expected.float(), rtol=torch.finfo(dtype).eps, atol=1e-5)


def test_non_finite_values_pass_through(device):
    y, a, b = _operands(4, 6, 3, torch.bfloat16, device)
    y[0, 0], y[1, 1], y[2, 2] = float("nan"), float("inf"), -float("inf")
    add_low_rank_(y, a, b, 1.0)
    assert y[0, 0].isnan() and y[1, 1] == float("inf") and y[2, 2] == -float("inf")
    assert y.isfinite().sum() == y.numel() - 3


def test_empty_and_rank_zero_leave_y(device):
    y, a, b = _operands(0, 7, 4, torch.float32, device)
    add_low_rank_(y, a, b, 1.0)
    y, a, b = _operands(3, 7, 0, torch.float32, device)
    before = y.clone()
    add_low_rank_(y, a, b, 1.0)
    assert torch.equal(y, before)


def test_bad_inputs_are_named(device):
    y, a, b = _operands(5, 6, 2, torch.float32, device)
    with pytest.raises(ValueError, match="2-D"):
        add_low_rank_(y[None], a, b, 1.0)
    with pytest.raises(ValueError, match=r"a \(M, r\)"):
        add_low_rank_(y, a[:4], b, 1.0)
    with pytest.raises(ValueError, match=r"b \(N, r\)"):
        add_low_rank_(y, a, b[:, :1], 1.0)
    with pytest.raises(TypeError, match="one dtype"):
        add_low_rank_(y, a.double(), b, 1.0)
