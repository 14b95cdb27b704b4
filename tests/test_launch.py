"""kernels/_launch.py: the launch key and the cached launch path.

The key must be at least as fine as Triton's specialisation (else a kernel compiled for aligned
pointers or for a size of 1 would run on arguments it was not compiled for): checked on CPU. On a
GPU, the cached path is taken after the first call of a key, Triton's own path for every new key,
and the results equal the reference for aligned and misaligned inputs alike.
"""

import pytest
import torch

from lightning_fastft.kernels import _launch
from lightning_fastft.kernels._launch import _specialisation
from lightning_fastft.kernels.rms_norm import _rms_norm_forward_kernel, rms_norm, rms_norm_reference


def test_key_tells_apart_what_triton_specialises_on():
    base = torch.empty(64, dtype=torch.float32)
    aligned, misaligned = base[:8], base[1:9]
    assert _specialisation(aligned, False) != _specialisation(misaligned, False)  # 16-byte alignment
    assert _specialisation(aligned, False) != _specialisation(aligned.to(torch.float64), False)  # dtype
    assert _specialisation(aligned, False) == _specialisation(base[4:12], False)  # same dtype, both aligned
    ints = [_specialisation(value, False) for value in (1, 2, 3, 16, 32, 2**31, 2**63)]
    assert ints[1] == ints[2]  # neither 1 nor a multiple of 16: one specialisation
    assert ints[3] == ints[4]  # multiples of 16
    assert len({ints[0], ints[1], ints[3], ints[5], ints[6]}) == 5  # 1, other, %16, 64-bit, unsigned 64-bit
    assert _specialisation(True, False) != _specialisation(1, False)
    assert _specialisation(0.5, False) == _specialisation(2.0, False)  # floats are not specialised
    assert _specialisation(64, True) != _specialisation(128, True)  # a constexpr's value is its key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cached path launches compiled CUDA kernels")
def test_cached_launches_match_the_reference(monkeypatch):
    calls = []
    original_run = type(_rms_norm_forward_kernel).run

    def counting_run(self, *args, **kwargs):
        calls.append(self)
        return original_run(self, *args, **kwargs)

    monkeypatch.setattr(type(_rms_norm_forward_kernel), "run", counting_run)
    monkeypatch.setattr(_launch, "_KERNELS", {})
    weight = torch.randn(37, device="cuda")
    storage = torch.randn(7 * 37 + 1, device="cuda")
    inputs = [storage[:-1].view(7, 37), storage[1:].view(7, 37), storage[:-1].view(7, 37) * 2, storage[1:].view(7, 37)]
    for x in inputs:  # aligned, misaligned, aligned (cached), misaligned (cached)
        torch.testing.assert_close(rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6))
    assert len(calls) == 2  # Triton's path once per key
    (info,) = _launch._KERNELS.values()
    assert len(info.compiled) == 2
