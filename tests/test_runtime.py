"""The CPU fallback notice: one line per process, whichever kernels fall back."""

import importlib
import warnings

import torch

from lightning_fastft import _runtime

glu_module = importlib.import_module("lightning_fastft.kernels.glu")
rms_norm_module = importlib.import_module("lightning_fastft.kernels.rms_norm")


def test_all_fallbacks_share_one_warning(monkeypatch):
    monkeypatch.setattr(glu_module, "triton_enabled", lambda *tensors: False)
    monkeypatch.setattr(rms_norm_module, "triton_enabled", lambda *tensors: False)
    monkeypatch.setattr(_runtime, "_warned", set())
    x = torch.randn(3, 7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            glu_module.glu(x, x + 1.0, "silu")
            rms_norm_module.rms_norm(x, torch.rand(7) + 0.5, 1e-6)
    messages = [str(w.message) for w in caught if "PyTorch reference" in str(w.message)]
    assert messages == [
        "lightning_fastft: glu runs its PyTorch reference, as every kernel will in this process "
        "(no CUDA device and TRITON_INTERPRET is not set); results are identical, only slower."
    ]
    assert _runtime._warned == {"glu", "rms_norm"}
