"""Test set-up: on a machine without CUDA the Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before triton is imported (transformers imports it), so this
runs before any project import.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Each test draws its own random inputs (seeded by the test name, so failures reproduce)."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
