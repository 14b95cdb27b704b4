"""Where the Triton kernels can run, and the one-time warning when they cannot.

The kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before ``triton`` is imported, as the tests do). Anywhere
else every public op falls back to its PyTorch reference, with one warning per process.
"""

from __future__ import annotations

import os
import warnings

import torch

_warned: set[str] = set()


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_enabled(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels can run on these tensors."""
    if all(t.is_cuda for t in tensors):
        return True
    return triton_interpreting() and all(t.device.type == "cpu" for t in tensors)


def warn_fallback(op: str) -> None:
    """Warn once per process, at the first op that runs its PyTorch reference instead of its
    Triton kernel (every op does so for the same reason); ``_warned`` records the ops."""
    first = not _warned
    _warned.add(op)
    if first:
        warnings.warn(
            f"lightning_fastft: {op} runs its PyTorch reference, as every kernel will in this process "
            "(no CUDA device and TRITON_INTERPRET is not set); results are identical, only slower.",
            stacklevel=3,
        )
