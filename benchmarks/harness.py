"""What every benchmark script shares: models, one timer, one peak-memory reader, one results writer
and one longest-length search.

Scripts import it as ``import harness`` (``python benchmarks/x.py`` puts ``benchmarks/`` first on
``sys.path``; a script loaded another way inserts it) and import nothing from each other.

* Models: :data:`SHAPES` (Llama-3-8B, Qwen2-7B, Llama-3.2-1B and a tiny shape), :func:`model_fields`
  (the config dict ``CausalLMFineTune(model=...)`` takes), :func:`model_config`,
  :func:`build_lora_model` (random bf16 weights on the device, LoRA / QLoRA, for plain-loop
  benchmarks), :func:`set_checkpointing` (switch a built model between ``none``, HF gradient
  checkpointing and our ``recompute`` / ``offload``) and :func:`apply_liger`.
* Time: :class:`Stopwatch` (wall seconds, the device synchronised at both ends; one lap or many),
  :func:`time_steps`; kernel times: :func:`graph_ms` (CUDA-graph replays timed with events),
  :func:`launch_ms` (``triton.testing.do_bench`` median), :func:`kernel_times` and
  :func:`launched_time_and_memory`.
* Memory: :class:`PeakMemory` (peak allocated CUDA memory after a reset, absolute and above the
  allocation at the reset).
* Results: :func:`run_meta` (the exact command and the environment), :func:`write_results`
  (``<out>.json`` = ``{"meta", "results"}`` and ``<out>.md`` = title, command, environment,
  notes, Markdown table), :func:`load_results` (also reads the layouts older scripts wrote).
* Search: :func:`search_longest` (the longest length a probe passes: doubling up from a start,
  then bisection; or bisection alone between given brackets).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GIB = 2**30
MIB = 2**20

# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
SHAPES: dict[str, dict[str, Any]] = {
    "llama8b": {
        "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0,
        "max_position_embeddings": 131072,
    },
    "llama70b": {
        "model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0,
        "max_position_embeddings": 131072,
    },
    "qwen7b": {
        "model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "intermediate_size": 18944,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1000000.0,
        "max_position_embeddings": 131072,
    },
    "llama1b": {
        "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0,
        "max_position_embeddings": 131072, "tie_word_embeddings": True,
    },
    "tiny": {
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 160,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 4096,
    },
}  # fmt: skip
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_R = 16
"""LoRA r16, alpha 16, dropout 0 on every projection: the adapters of the model-level benchmarks."""
LIGER_FUNCTIONS = {"llama": "apply_liger_kernel_to_llama", "qwen2": "apply_liger_kernel_to_qwen2"}
CHECKPOINTING_MODES = ("none", "hf", "recompute", "offload")
KERNEL_COLUMNS = (
    "kernel", "shape", "dtype", "impl", "fwd_ms", "bwd_ms", "fwd_launch_ms", "bwd_launch_ms", "fwd_gbps", "bwd_gbps",
    "peak_mib",
)  # fmt: skip
"""The columns of the kernel micro-benchmark tables (``bench_kernels.py`` and each suite's own ``__main__``)."""


def model_fields(shape: str, layers: Optional[int] = None) -> dict[str, Any]:
    """The HF config dict of ``shape`` (``layers`` overrides the decoder depth), SDPA attention, no KV cache."""
    fields = {**SHAPES[shape], "attn_implementation": "sdpa", "use_cache": False}
    if layers is not None:
        fields["num_hidden_layers"] = layers
    return fields


def model_config(shape: str, layers: Optional[int] = None):
    """:func:`model_fields` as a transformers ``PretrainedConfig``."""
    from transformers import AutoConfig

    fields = model_fields(shape, layers)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def build_lora_model(config, device: str, quant: Optional[str], lora_r: int = LORA_R):
    """Random-init bf16 causal LM built directly on ``device``, with LoRA (QLoRA for ``quant="nf4"``),
    for the benchmarks that train in a plain loop (``train_bench.py`` builds through ``CausalLMFineTune``).
    With ``nf4`` the decoder layers are built and quantised one at a time, so a model whose bf16
    weights exceed the device (the 70B shape on 80 GB) can be built."""
    import copy

    from transformers import AutoModelForCausalLM

    from lightning_fastft.bnb import quantize_linear_layers
    from lightning_fastft.qlora import attach_lora, prepare_qlora

    if quant not in (None, "nf4"):
        raise ValueError(f"quant must be None or 'nf4', got {quant!r}")
    layers = config.num_hidden_layers
    if quant == "nf4":
        config = copy.deepcopy(config)
        config.num_hidden_layers = 1
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.config.use_cache = False
    lora = {"lora_r": lora_r, "lora_alpha": lora_r, "lora_dropout": 0.0, "target_modules": LORA_TARGETS}
    if quant is None:
        return attach_lora(model, **lora)
    stack = model.get_decoder().layers
    quantize_linear_layers(stack[0])
    model.config.num_hidden_layers = layers
    for index in range(1, layers):
        with torch.device(device):
            layer = type(stack[0])(model.config, index).to(torch.bfloat16)
        for module in layer.modules():
            model._init_weights(module)
        quantize_linear_layers(layer)
        stack.append(layer)
    return prepare_qlora(model, quant_type="nf4", **lora)


def enable_hf_checkpointing(hf_model, input_require_grads: bool = True) -> None:
    """HF gradient checkpointing (non-reentrant); with ``input_require_grads`` also
    ``enable_input_require_grads`` (the embeddings' output requires grad).

    transformers >= 5.20 renamed the method (the old name warns)."""
    enable = getattr(hf_model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if input_require_grads:
        hf_model.enable_input_require_grads()


def set_checkpointing(model: torch.nn.Module, mode: str, checkpoint_fraction: float = 1.0) -> None:
    """Switch ``model`` (a PEFT/HF causal LM) to one mode of :data:`CHECKPOINTING_MODES`;
    ``checkpoint_fraction`` applies to ``recompute`` and ``offload``."""
    from lightning_fastft.training.checkpointing import (
        apply_activation_checkpointing,
        disable_hf_gradient_checkpointing,
        hf_gradient_checkpointing_on,
        remove_activation_checkpointing,
    )

    remove_activation_checkpointing(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hf_gradient_checkpointing_on(base):
        disable_hf_gradient_checkpointing(base)
        base.disable_input_require_grads()  # HF's enable hooked the embeddings
    if mode == "hf":
        enable_hf_checkpointing(base, input_require_grads=False)
    elif mode in ("recompute", "offload"):
        apply_activation_checkpointing(model, mode, checkpoint_fraction=checkpoint_fraction)
    elif mode != "none":
        raise ValueError(f"mode must be one of {CHECKPOINTING_MODES}, got {mode!r}")


def apply_liger(hf_model) -> None:
    """Liger-Kernel's ``apply_liger_kernel_to_<model_type>`` on the instance (RoPE, RMSNorm, SwiGLU,
    fused linear cross-entropy). It also rebinds transformers module globals: run it in its own process."""
    import liger_kernel.transformers as liger

    model_type = hf_model.config.model_type
    if model_type not in LIGER_FUNCTIONS:
        raise ValueError(f"no Liger-Kernel patch wired for model_type {model_type!r}")
    getattr(liger, LIGER_FUNCTIONS[model_type])(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True, model=hf_model
    )


def is_out_of_memory(error: BaseException) -> bool:
    return "OutOfMemoryError" in type(error).__name__ or "out of memory" in str(error).lower()


# ---------------------------------------------------------------------------------------------
# time
# ---------------------------------------------------------------------------------------------
def synchronize(device: Any = None) -> None:
    """Wait for ``device``'s queued work: a no-op for ``None`` and non-CUDA devices."""
    if device is None:
        return
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall-clock seconds with ``time.perf_counter``, ``device`` synchronised before the start and
    before the stop (``device=None``: host time only, nothing synchronised).

    ``start()``/``stop()`` (or ``with stopwatch:``) time one lap; ``laps`` keeps every lap."""

    def __init__(self, device: Any = None) -> None:
        self.device = device
        self.laps: list[float] = []
        self._start: Optional[float] = None

    def start(self) -> Stopwatch:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def stop(self) -> float:
        if self._start is None:
            raise RuntimeError("Stopwatch.stop() before start()")
        synchronize(self.device)
        self.laps.append(time.perf_counter() - self._start)
        self._start = None
        return self.laps[-1]

    def __enter__(self) -> Stopwatch:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def seconds(self) -> float:
        """The last lap."""
        return self.laps[-1]

    def median(self, skip: int = 0) -> float:
        """Median lap after the first ``skip`` (warm-up) laps; all laps when there are no more."""
        return statistics.median(self.laps[skip:] or self.laps)


def time_steps(step: Callable[[], Any], steps: int, device: Any = "cuda") -> list[float]:
    """Seconds of each of ``steps`` calls of ``step``, each a synchronised :class:`Stopwatch` lap."""
    stopwatch = Stopwatch(device)
    for _ in range(steps):
        with stopwatch:
            step()
    return stopwatch.laps


def launch_ms(fn: Callable[[], Any], grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> float:
    """Median ms of ``fn`` launched from Python: ``triton.testing.do_bench`` (L2 flushed before each call)."""
    from triton.testing import do_bench

    return do_bench(fn, grad_to_none=grad_to_none, return_mode="median")


def median_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """:func:`launch_ms` on CUDA; elsewhere the median wall time of three calls (a CPU check of a script)."""
    if device.type == "cuda":
        return launch_ms(fn)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| / max |reference| (``reference`` in fp32)."""
    return ((actual.float() - reference).abs().max() / reference.abs().max()).item()


_L2_ROTATION_BYTES = 4 * 50 * 2**20  # input sets per graph cover 4x the H100's 50 MiB L2
_MAX_INPUT_SETS = 8
_GRAPH_REPLAYS = 15


def _as_tuple(outputs) -> tuple:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def _set_bytes(inputs: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))


def graph_ms(step: Callable[[int], None], n_sets: int, min_steps: int = 24) -> float:
    """Median GPU ms of ``step(i)`` from CUDA-graph replays, ``i`` cycling over ``range(n_sets)``.

    No CPU launch overhead is included: what the kernels cost inside a training step where the CPU
    runs ahead of the GPU. Each replay is timed with CUDA events; the median over replays."""
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


def kernel_times(
    make_inputs: Callable[[], Sequence[torch.Tensor]],
    forward: Callable,
    grads_for: Callable,
    bytes_fwd: int | None = None,
    bytes_bwd: int | None = None,
    fb_overhead_ms: float = 0.0,
) -> dict:
    """Times (graph and launch-bound), GB/s and peak memory of ``forward(*make_inputs())``.

    * ``fwd_ms`` / ``bwd_ms``: GPU time (:func:`graph_ms`), the pass captured many times over,
      rotating among enough input sets that L2 cannot hold them.
    * ``fwd_launch_ms`` / ``bwd_launch_ms``: :func:`launch_ms` of the pass launched from Python. At
      small sizes these measure the CPU cost of the Python wrapper, autograd and the launches.

    ``bwd`` is (forward + backward) minus forward, both timed the same way (a backward can't be
    replayed alone: some implementations, e.g. Liger's GLU, overwrite their saved tensors); the
    gradients fed to the backward are random tensors made before timing. The forward alone runs
    under ``no_grad``. ``peak_mib``: the peak memory of one forward + backward above what was
    allocated before it (its inputs and incoming gradients).

    ``make_inputs`` returns leaf tensors (those requiring grad get ``.grad``); ``grads_for``
    maps the forward's outputs to gradients of the same shapes. ``fb_overhead_ms`` is GPU time
    the forward adds only when recording autograd (e.g. a clone making an in-place op legal),
    subtracted from the graph backward time.
    """
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
        fwd_launch_ms = launch_ms(lambda: forward(*inputs))
    fb_launch_ms = launch_ms(lambda: forward_backward_step(0))
    bwd_launch_ms = max(fb_launch_ms - fwd_launch_ms, 0.0)
    for leaf in leaves[0]:
        leaf.grad = None
    with PeakMemory("cuda") as memory:
        torch.autograd.backward(_as_tuple(forward(*inputs)), grads)
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
        "peak_mib": memory.above_baseline / MIB,
    }


def launched_time_and_memory(forward: Callable[[], Any], leaves: Sequence[torch.Tensor]) -> tuple[float, float, float]:
    """(fwd_ms, bwd_ms, peak_mib) of ``forward()`` (a tensor or a tuple) launched from Python:
    :func:`launch_ms` medians, backward fed random gradients; for GPU-bound sizes. ``fwd_ms``
    includes autograd recording; ``bwd_ms`` is (forward + backward) minus forward."""
    outputs = _as_tuple(forward())
    grads = [torch.randn_like(o) for o in outputs]
    del outputs

    def step():
        torch.autograd.backward(_as_tuple(forward()), grads)

    fwd_ms = launch_ms(forward, grad_to_none=leaves)
    step_ms = launch_ms(step, grad_to_none=leaves)
    for leaf in leaves:
        leaf.grad = None
    with PeakMemory("cuda") as memory:
        step()
    for leaf in leaves:
        leaf.grad = None
    return fwd_ms, max(step_ms - fwd_ms, 0.0), memory.above_baseline / MIB


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
def graph_pool_idle_bytes(device: Any = "cuda") -> int:
    """Bytes of the private memory pools (CUDA graphs') not allocated to a live tensor. A graph's
    temporaries and the activations its replays keep between forward and backward live there: the
    allocator counts them free after the capture, yet every replay writes them and no other
    allocation may take them."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    return sum(
        segment["total_size"] - segment["allocated_size"]
        for segment in torch.cuda.memory_snapshot()
        if tuple(segment["segment_pool_id"]) != (0, 0) and segment.get("device", index) == index
    )


class PeakMemory:
    """Peak CUDA memory of ``device`` between ``start()`` and ``stop()`` (or a ``with`` block).

    ``start()`` synchronises, records the bytes allocated (``baseline``) and resets the peak;
    ``stop()`` synchronises and reads the peak. ``peak``: bytes, absolute: what
    ``torch.cuda.max_memory_allocated`` reports plus the CUDA graph pools' idle bytes
    (:func:`graph_pool_idle_bytes`; none without graphs); ``above_baseline``: the peak minus ``baseline``.
    """

    def __init__(self, device: Any = "cuda") -> None:
        self.device = torch.device(device)
        self.baseline = 0
        self.peak = 0

    def start(self) -> PeakMemory:
        synchronize(self.device)
        self.baseline = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def stop(self) -> int:
        synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device) + graph_pool_idle_bytes(self.device)
        return self.peak

    def __enter__(self) -> PeakMemory:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def above_baseline(self) -> int:
        return self.peak - self.baseline

    @property
    def peak_gib(self) -> float:
        return self.peak / GIB


def live_at_peak(events: Sequence[dict], keep: Sequence[str] = ("lightning_fastft", "transformers", "peft")):
    """What was allocated at the moment of most memory in a CUDA allocator trace (the events of
    ``torch.cuda.memory._snapshot()["device_traces"][device]``, recorded with Python stacks).

    Counts only allocations the trace saw (``alloc`` adds, ``free_completed`` removes: what
    ``torch.cuda.memory_allocated`` follows). Returns ``(peak_bytes, rows)``, the rows
    ``{"where", "mib", "count"}`` largest first: the live allocations grouped by their innermost
    frame in a file whose path contains one of ``keep`` (else their innermost frame)."""

    def replay(stop: int) -> tuple[dict, int, int]:
        live, total, peak, peak_at = {}, 0, 0, -1
        for i, event in enumerate(events[:stop]):
            if event["action"] == "alloc":
                live[event["addr"]] = event
                total += event["size"]
            elif event["action"] == "free_completed" and event["addr"] in live:
                total -= live.pop(event["addr"])["size"]
            if total > peak:
                peak, peak_at = total, i
        return live, peak, peak_at

    _, peak, peak_at = replay(len(events))
    live, _, _ = replay(peak_at + 1)
    groups: dict[str, list[int]] = {}
    for event in live.values():
        frames = event.get("frames") or [{"filename": "?", "line": 0, "name": "?"}]
        frame = next((f for f in frames if any(k in f["filename"] for k in keep)), frames[0])
        path = frame["filename"]
        short = next((path[path.index(k) :] for k in keep if k in path), path.rsplit("/", 1)[-1])
        where = f"{short}:{frame['line']} {frame['name']}"
        group = groups.setdefault(where, [0, 0])
        group[0] += event["size"]
        group[1] += 1
    rows = [{"where": w, "mib": b / MIB, "count": n} for w, (b, n) in groups.items()]
    return peak, sorted(rows, key=lambda row: -row["mib"])


def record_peak(fn: Callable[[], Any], device: Any = "cuda", max_entries: int = 500_000):
    """Run ``fn()`` with the CUDA allocator's history recorded (Python stacks): :func:`live_at_peak`
    of what it allocated."""
    synchronize(device)
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=max_entries, device=device)
    try:
        fn()
        synchronize(device)
        snapshot = torch.cuda.memory._snapshot(device)
    finally:
        torch.cuda.memory._record_memory_history(enabled=None, device=device)
    index = torch.device(device).index or 0
    return live_at_peak(snapshot["device_traces"][index])


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_meta(argv: Optional[Sequence[str]] = None, **extra: Any) -> dict[str, Any]:
    """``{"command": "python <argv>", "environment": ..., **extra}``: the exact command of this run."""
    argv = sys.argv if argv is None else argv
    return {"command": "python " + " ".join(argv), "environment": environment(), **extra}


def cell(value: Any, integers_from: float = 10) -> str:
    """A table cell: floats to 3 decimals below ``integers_from`` and rounded to integers from it on,
    lists of floats joined by spaces, ``None`` empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < integers_from else f"{value:.0f}"
    if isinstance(value, list) and value and all(isinstance(v, float) for v in value):
        return " ".join(f"{v:.3f}" for v in value)
    return str(value)


def markdown_table(rows: Iterable[dict], columns: Sequence[str], integers_from: float = 10) -> str:
    """A Markdown table of ``columns`` (:func:`cell` formats the values)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c), integers_from) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    out: Path,
    title: str,
    meta: dict,
    rows: list[dict],
    columns: Sequence[str],
    notes: Sequence[str] = (),
    integers_from: float = 10,
) -> None:
    """``out`` (JSON: ``{"meta": meta, "results": rows}``) and ``out`` with ``.md`` (title, command,
    environment, the table of ``columns``, then ``notes``: Markdown lines)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    environment_line = ", ".join(f"{key} {value}" for key, value in meta.get("environment", {}).items())
    markdown = [f"# {title}", "", f"Command: `{meta['command']}`", "", f"Environment: {environment_line}", ""]
    markdown += [markdown_table(rows, columns, integers_from), ""]
    markdown += list(notes)
    out.with_suffix(".md").write_text("\n".join(markdown) + "\n")


def load_results(path: Path) -> tuple[dict, list[dict]]:
    """``(meta, rows)`` of a results JSON: :func:`write_results`' layout, or the layouts the scripts
    wrote before the harness (bench_kernels ``{"meta", "rows"}``; max_context ``{"command", "gpu",
    "variants"}``, one row per variant with this harness's keys)."""
    data = json.loads(Path(path).read_text())
    if "results" in data:
        return data["meta"], data["results"]
    if "rows" in data:
        return data["meta"], data["rows"]
    if "variants" in data:  # max_context.py before the harness
        meta = {"command": data["command"], "environment": {"gpu": data.get("gpu")}}
        rows = [
            {"variant": variant, "max_seq_len_fits": found["longest_fitting"],
             "first_failing_seq_len": found["shortest_failing"], "complete": found["complete"],
             "probes": [{**probe, "status": "ok" if probe["fits"] else "oom"} for probe in found["probes"]]}
            for variant, found in data["variants"].items()
        ]  # fmt: skip
        return meta, rows
    raise ValueError(f"{path}: not a results file this harness knows")


# ---------------------------------------------------------------------------------------------
# search
# ---------------------------------------------------------------------------------------------
def search_longest(
    probe: Callable[[int], dict],
    *,
    granularity: int,
    high: int,
    start: Optional[int] = None,
    low: Optional[int] = None,
    tolerance: Optional[Callable[[int], int]] = None,
    deadline: Optional[float] = None,
) -> dict[str, Any]:
    """The longest length ``probe`` passes, between two brackets: the longest length known to pass
    and the shortest known to fail.

    ``probe(length)`` returns a record with a ``"status"``: ``"ok"`` (passes), one starting with
    ``"error"`` or ``"skipped"`` (stops the search) or anything else (fails, e.g. ``"oom"``).

    * With ``start``: the first probe is ``start``; while nothing has failed the length doubles (up
      to ``high``, stopping when ``high`` passes); then bisection.
    * With ``low`` instead: plain bisection over the multiples of ``granularity`` in
      ``[low, high]`` (the brackets start just outside them).

    Bisection probes the midpoint of the brackets rounded down to ``granularity`` and stops when
    the brackets are at most ``tolerance(longest passing)`` apart (default: ``granularity``).
    No probe starts after ``deadline`` (``time.monotonic()``).

    Returns ``{"max_seq_len_fits": longest passing (0: none), "first_failing_seq_len": shortest
    failing (None: none), "complete": the brackets closed, "error": the stopping status or None,
    "probes": every record with its "seq_len"}``.
    """
    if (start is None) == (low is None):
        raise ValueError("give exactly one of start (grow then bisect) and low (bisect only)")
    tolerance = tolerance or (lambda fits: granularity)
    found_fits, found_fails, probes, error = 0, None, [], None
    if low is not None:
        low, high = low // granularity * granularity, high // granularity * granularity
        fits, fails = low - granularity, high + granularity
        length: Optional[int] = (fits + fails) // 2 // granularity * granularity
    else:
        fits, fails, length = 0, None, start
    while length is not None and (deadline is None or time.monotonic() < deadline):
        record = {"seq_len": length, **probe(length)}
        probes.append(record)
        status = record["status"]
        if status.startswith(("skipped", "error")):
            error = status
            break
        if status == "ok":
            fits = found_fits = length
        else:
            fails = length
            found_fails = length
        if fails is None:
            length = min(2 * length, high) if length < high else None
        else:
            middle = (fits + fails) // 2 // granularity * granularity
            length = middle if fails - fits > tolerance(fits) and middle > fits else None
    return {"max_seq_len_fits": found_fits, "first_failing_seq_len": found_fails,
            "complete": length is None and error is None, "error": error, "probes": probes}  # fmt: skip
