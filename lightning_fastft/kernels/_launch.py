"""Launch settings of every Triton kernel: one policy, one :class:`LaunchPolicy` per op.

A kernel that reads rows handles ``block`` elements of a row at once: the row width rounded up to a
power of two, capped at ``max_block`` for kernels that loop or tile over long rows. ``num_warps``
follows the block (4 up to 1024 elements, 8 up to 4096, 16 beyond) unless the op fixes it; rows
narrower than :data:`ROW_TILE` go several to a step (:meth:`LaunchPolicy.rows_at_once`). A
persistent kernel (a grid of programs each looping over a chunk of rows) runs
``programs_per_sm`` programs per multiprocessor. Each op module holds its policy in ``_LAUNCH``,
so a tuning sweep can swap it (``module._LAUNCH = LaunchPolicy(...)``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import triton
from triton.compiler import CompiledKernel
from triton.runtime.jit import JITFunction

MAX_BLOCK = 4096
"""Most elements one program holds at once in a kernel that tiles its rows."""

ROW_TILE = 2048
"""Elements a row kernel handles at once: rows narrower than this go several per step
(:meth:`LaunchPolicy.rows_at_once`), so that short rows (a 128-wide per-head norm) do not leave
a program one tiny row per step."""

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

    def rows_at_once(self, block: int) -> int:
        """Rows a row kernel with ``block``-wide rows handles per step: :data:`ROW_TILE` elements."""
        return max(1, ROW_TILE // block)

    def persistent_programs(self, n_rows: int, device: torch.device) -> int:
        """Grid size of a persistent kernel over ``n_rows`` rows: ``programs_per_sm`` per SM on
        CUDA, :data:`_INTERPRETER_PROGRAMS` under the interpreter, never more than the rows."""
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            workers = self.programs_per_sm * _multiprocessor_count(index)
        else:
            workers = _INTERPRETER_PROGRAMS
        return max(1, min(n_rows, workers))


WHOLE_ROW = LaunchPolicy()
"""One program per whole row, however wide: for kernels that reduce over the row in one sum."""


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)`` with Triton's per-call binding skipped once the kernel is
    compiled for arguments like these.

    Triton's own launch path binds the arguments to the signature, computes their specialisation
    and a cache key, evaluates launch metadata and calls two (empty) hook chains on every call.
    On an H200 machine that is only a few microseconds of a launch's host cost (the rest is the op's
    Python wrapper, its autograd Function and PyTorch; ``benchmarks/results/launch_ab_llama8b_bs1.md``).
    Here the first call with a given
    specialisation goes through ``kernel[grid]`` (compiling as usual) and keeps the compiled
    kernel under a key at least as fine as Triton's: per tensor its dtype and whether its address
    is 16-byte aligned, per integer whether it is 1, divisible by 16 and its width, the exact value
    of every ``tl.constexpr`` and keyword (block sizes, ``num_warps``), the current device. Later
    calls with that key hand the arguments straight to the compiled kernel's launcher, as the
    runner of ``CompiledKernel[grid]`` does. Under the Triton interpreter, while launch hooks are
    installed (profilers), on a Triton without this launcher layout, or with :data:`CACHED_LAUNCH`
    off, every call is ``kernel[grid]``. Keywords are for constexprs and launch options (their values
    are the key); tensors go by position.
    """
    if not CACHED_LAUNCH or _HOOKS is None or not isinstance(kernel, JITFunction) or _HOOKS[0].calls or _HOOKS[1].calls:
        kernel[grid](*args, **kwargs)
        return
    device = _current_device()
    info = _KERNELS.get(kernel) or _KERNELS.setdefault(kernel, _KernelInfo(kernel))
    key = (device, tuple(kwargs.items()), *map(_specialisation, args, info.constexpr))
    compiled = info.compiled.get(key)
    if compiled is None:
        compiled = kernel[grid](*args, **kwargs)
        if isinstance(compiled, CompiledKernel):
            info.compiled[key] = _Launch(compiled, info.tail(len(args)))
        return
    values = [kwargs[name] if name in kwargs else default for name, default in compiled.tail]
    compiled.run(
        grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, _current_stream(device),
        compiled.function, compiled.packed_metadata, None, None, None, *args, *values,
    )  # fmt: skip


def _specialisation(value: Any, constexpr: bool) -> Any:
    """What Triton specialises a non-constexpr argument on (or finer); a constexpr's value."""
    if constexpr:
        return value
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value == 1, value % 16 == 0, -(2**31) <= value < 2**31, -(2**63) <= value < 2**63
    if isinstance(value, float):
        return float
    return value


class _KernelInfo:
    """A kernel's parameters (constexpr or not, defaults) and its compiled launches by key."""

    def __init__(self, kernel: JITFunction):
        self.params = [(param.name, param.default) for param in kernel.params]
        self.constexpr = [param.is_constexpr for param in kernel.params]
        self.compiled: dict[tuple, _Launch] = {}

    def tail(self, n_positional: int) -> tuple[tuple[str, Any], ...]:
        """The parameters after the first ``n_positional``, with their defaults."""
        return tuple(self.params[n_positional:])


class _Launch:
    """A compiled kernel's launcher and what it takes besides the call's arguments."""

    __slots__ = ("run", "function", "packed_metadata", "tail")

    def __init__(self, compiled: CompiledKernel, tail: tuple[tuple[str, Any], ...]):
        compiled._init_handles()
        self.run, self.function, self.packed_metadata = compiled.run, compiled.function, compiled.packed_metadata
        self.tail = tail


def _launch_hooks() -> tuple[Any, Any] | None:
    """Triton's launch hook chains (empty unless a profiler installed hooks), or None when this
    Triton has no hook chains or no launcher layout :func:`launch` knows (then it never bypasses)."""
    try:
        from triton import knobs
        from triton.knobs import HookChain
    except ImportError:
        return None
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    layout = all(hasattr(CompiledKernel, name) for name in ("_init_handles", "launch_metadata"))
    return hooks if layout and all(isinstance(hook, HookChain) for hook in hooks) else None


_current_device = torch.cuda.current_device


def _current_stream(device: int) -> int:
    """The raw current stream of ``device``, as Triton's own launch path reads it."""
    return triton.runtime.driver.active.get_current_stream(device)


CACHED_LAUNCH = True
"""Set False to launch every kernel through Triton's own path (``benchmarks/profile_step.py
--launch-ab`` measures what the cached path saves)."""
_KERNELS: dict[JITFunction, _KernelInfo] = {}
_HOOKS = _launch_hooks()
