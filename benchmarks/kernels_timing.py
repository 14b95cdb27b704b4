"""Timing shared by the kernel micro-benchmarks (CUDA only).

:func:`measure` gives, for one implementation of an op, two times per pass:

* ``fwd_ms`` / ``bwd_ms``: GPU time. The pass is captured in a CUDA graph many times over,
  rotating among enough input sets that L2 cannot hold them, and the graph replays are timed
  with events (median replay over repetitions). No CPU launch overhead is included: this is
  what the kernels cost inside a training step where the CPU runs ahead of the GPU.
* ``fwd_launch_ms`` / ``bwd_launch_ms``: ``triton.testing.do_bench`` medians of the pass
  launched from Python (L2 flushed before each). At small sizes these measure the CPU cost of
  the Python wrapper, autograd and the launches, not the GPU.

``bwd`` is (forward + backward) minus forward, both timed the same way (a backward can't be
replayed alone: some implementations, e.g. Liger's GLU, overwrite their saved tensors); the
gradients fed to the backward are random tensors made before timing. The forward alone runs
under ``no_grad``. ``peak_mib`` is the peak memory of one
forward + backward above what was allocated before it (its inputs and incoming gradients).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch

_L2_ROTATION_BYTES = 4 * 50 * 2**20  # input sets per graph cover 4x the H100's 50 MiB L2
_MAX_INPUT_SETS = 8
_GRAPH_REPLAYS = 15


def _as_tuple(outputs) -> tuple:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def _set_bytes(inputs: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))


def graph_ms(step: Callable[[int], None], n_sets: int, min_steps: int = 24) -> float:
    """Median GPU ms of ``step(i)`` from CUDA-graph replays, ``i`` cycling over ``range(n_sets)``."""
    n_steps = n_sets * max(1, -(-min_steps // n_sets))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: compiles kernels, fills the allocator
        for i in range(n_sets):
            step(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n_steps):
            step(i % n_sets)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(_GRAPH_REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / n_steps)
    del graph
    torch.cuda.synchronize()
    return statistics.median(times)


def measure(
    make_inputs: Callable[[], Sequence[torch.Tensor]],
    forward: Callable,
    grads_for: Callable,
    bytes_fwd: int | None = None,
    bytes_bwd: int | None = None,
    fb_overhead_ms: float = 0.0,
) -> dict:
    """Times (graph and launch-bound), GB/s and peak memory of ``forward(*make_inputs())``.

    ``make_inputs`` returns leaf tensors (those requiring grad get ``.grad``); ``grads_for``
    maps the forward's outputs to gradients of the same shapes. ``fb_overhead_ms`` is GPU time
    the forward adds only when recording autograd (e.g. a clone making an in-place op legal),
    subtracted from the graph backward time.
    """
    from triton.testing import do_bench

    first = make_inputs()
    n_sets = max(2, min(_MAX_INPUT_SETS, -(-_L2_ROTATION_BYTES // max(1, _set_bytes(first)))))
    input_sets = [first] + [make_inputs() for _ in range(n_sets - 1)]
    with torch.no_grad():
        grad_sets = [[g.detach() for g in _as_tuple(grads_for(forward(*inputs)))] for inputs in input_sets]
    leaves = [[t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad] for inputs in input_sets]

    def forward_step(i: int) -> None:
        with torch.no_grad():
            forward(*input_sets[i])

    def forward_backward_step(i: int) -> None:
        torch.autograd.backward(_as_tuple(forward(*input_sets[i])), grad_sets[i])
        for leaf in leaves[i]:
            leaf.grad = None

    fwd_ms = graph_ms(forward_step, n_sets)
    bwd_ms = max(graph_ms(forward_backward_step, n_sets) - fwd_ms - fb_overhead_ms, 0.0)

    inputs, grads = input_sets[0], grad_sets[0]
    with torch.no_grad():
        fwd_launch_ms = do_bench(lambda: forward(*inputs), return_mode="median")
    fb_launch_ms = do_bench(lambda: forward_backward_step(0), return_mode="median")
    bwd_launch_ms = max(fb_launch_ms - fwd_launch_ms, 0.0)
    for leaf in leaves[0]:
        leaf.grad = None
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.autograd.backward(_as_tuple(forward(*inputs)), grads)
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    for leaf in leaves[0]:
        leaf.grad = None
    del input_sets, grad_sets, leaves, inputs, grads
    torch.cuda.empty_cache()
    return {
        "fwd_ms": fwd_ms,
        "bwd_ms": bwd_ms,
        "fwd_gbps": bytes_fwd / fwd_ms / 1e6 if bytes_fwd and fwd_ms > 0 else None,
        "bwd_gbps": bytes_bwd / bwd_ms / 1e6 if bytes_bwd and bwd_ms > 0 else None,
        "fwd_launch_ms": fwd_launch_ms,
        "bwd_launch_ms": bwd_launch_ms,
        "peak_mib": peak_mib,
    }


def launched_time_and_memory(forward, leaves):
    """(fwd_ms, bwd_ms, peak_mib) of ``forward()`` (a tensor or a tuple) launched from Python:
    ``do_bench`` medians, backward fed random gradients; for GPU-bound sizes."""
    from triton.testing import do_bench

    outputs = forward()
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = [torch.randn_like(o) for o in outputs]
    del outputs

    def step():
        out = forward()
        torch.autograd.backward(out if isinstance(out, tuple) else (out,), grads)

    fwd_ms = do_bench(forward, grad_to_none=leaves, return_mode="median")
    step_ms = do_bench(step, grad_to_none=leaves, return_mode="median")
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    for leaf in leaves:
        leaf.grad = None
    return fwd_ms, max(step_ms - fwd_ms, 0.0), peak_mib
