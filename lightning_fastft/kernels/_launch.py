"""Launch settings of every Triton kernel: one policy, one :class:`LaunchPolicy` per op.

A kernel that reads rows handles ``block`` elements of a row at once: the row width rounded up to a
power of two, capped at ``max_block`` for kernels that loop or tile over long rows. ``num_warps``
follows the block (4 up to 1024 elements, 8 up to 4096, 16 beyond) unless the op fixes it. A
persistent kernel (a grid of programs each looping over a chunk of rows) runs
``programs_per_sm`` programs per multiprocessor. Each op module holds its policy in ``_LAUNCH``,
so a tuning sweep can swap it (``module._LAUNCH = LaunchPolicy(...)``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

MAX_BLOCK = 4096
"""Most elements one program holds at once in a kernel that tiles its rows."""

_INTERPRETER_PROGRAMS = 4
"""Persistent programs under the Triton interpreter: few, each looping over many rows."""


@dataclass(frozen=True)
class LaunchPolicy:
    """``max_block``: cap on the block (``None``: the whole row in one block); ``num_warps``: a
    fixed warp count (``None``: from the block); ``programs_per_sm``: persistent programs per SM."""

    max_block: int | None = None
    num_warps: int | None = None
    programs_per_sm: int = 2

    def settings(self, n_cols: int) -> tuple[int, int]:
        """``(block, num_warps)`` for rows of ``n_cols`` elements."""
        block = triton.next_power_of_2(n_cols)
        if self.max_block is not None:
            block = min(self.max_block, block)
        if self.num_warps is not None:
            return block, self.num_warps
        return block, 4 if block <= 1024 else 8 if block <= 4096 else 16

    def persistent_programs(self, n_rows: int, device: torch.device) -> int:
        """Grid size of a persistent kernel over ``n_rows`` rows: ``programs_per_sm`` per SM on
        CUDA, :data:`_INTERPRETER_PROGRAMS` under the interpreter, never more than the rows."""
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            workers = self.programs_per_sm * _multiprocessor_count(index)
        else:
            workers = _INTERPRETER_PROGRAMS
        return max(1, min(n_rows, workers))


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
