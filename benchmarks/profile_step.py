"""Where a LoRA training step's time goes: wall time vs GPU kernel time, and the top kernels.

    . benchmarks/gpu_env.sh
    python benchmarks/profile_step.py --shape llama8b --seq-len 2048 --out benchmarks/results/profile_llama8b.json

One model (random bf16 weights, LoRA r16 on all linears, ``--batch`` rows, default 1) runs forward + backward + AdamW
steps under each mode in turn: ``hf`` (HF gradient checkpointing, HF modules) first, then the
model is patched in place and runs ``recompute``, ``offload``, ``none`` and ``recompute_half``
(fastft checkpointing modes; the last checkpoints every other layer). Per mode: the median step
time over ``--steps`` steps, then a ``torch.profiler`` trace of two steps giving the summed GPU
kernel time (``gpu_busy`` = kernel time / wall time; well below 1 means the step waits on the
host) and the kernels with the most GPU time. ``--host`` adds a cProfile of one step (Python functions by own time) and every
host-device synchronisation of one step, by the line that caused it. ``--launch-ab N`` times
``2 N`` more steps per fastft mode, alternating the kernels' cached launch path with Triton's own
(``lightning_fastft.kernels._launch.CACHED_LAUNCH``) step by step, so that drift of the machine
falls on both alike: the medians, and the host microseconds per launch of both paths. Writes
``<out>`` (JSON, one row per mode) and ``.md`` (``harness.write_results``).
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import io
import pstats
import statistics
import sys
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from lightning_fastft.kernels import _launch  # noqa: E402
from lightning_fastft.patching import patch_model  # noqa: E402

MODES = ("hf", "recompute", "offload", "none", "recompute_half")
COLUMNS = (
    "mode", "step_s", "tokens_per_sec", "wall_s", "gpu_kernel_s", "gpu_busy", "peak_gib", "cached_launch_step_s",
    "triton_launch_step_s",
)  # fmt: skip


def make_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor):
    def step() -> float:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def kernel_profile(step, top: int) -> dict:
    """GPU kernel time of two steps (summed per kernel name) against their wall time."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with harness.Stopwatch("cuda") as stopwatch:
            step()
            step()
        wall = stopwatch.seconds / 2
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(event.name, []).append(event.device_time / 2e6)  # us over 2 steps -> s per step
    totals = sorted(((sum(t), len(t) // 2, name) for name, t in kernels.items()), reverse=True)
    gpu_s = sum(t for t, _, _ in totals)
    return {
        "wall_s": wall,
        "gpu_kernel_s": gpu_s,
        "gpu_busy": gpu_s / wall,
        "top_kernels": [{"name": name[:120], "s": t, "calls": calls} for t, calls, name in totals[:top]],
    }


def host_profile(step, top: int) -> dict:
    """One step under cProfile (functions by own time, then by cumulative time) and under CUDA
    sync-debug mode (every host<->device synchronisation, counted by the Python line that caused it)."""
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.runcall(step)
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
        torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(0)
    syncs = collections.Counter(f"{w.filename}:{w.lineno}: {str(w.message)[:80]}" for w in caught
                                if "synchroniz" in str(w.message))  # fmt: skip
    return {"cprofile": text.getvalue().splitlines(), "syncs": syncs.most_common(top)}


def launch_costs(calls: int = 2000) -> dict:
    """Host microseconds per call of a few tiny ops (the GPU work is negligible): the floor
    under every op a training step launches."""
    import torch.nn.functional as F

    from lightning_fastft.kernels.rms_norm import rms_norm

    x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    norm_weight = torch.ones(64, device="cuda", dtype=torch.bfloat16)
    ops = {
        "torch.add": lambda: x + x,
        "x.to(same dtype)": lambda: x.to(torch.bfloat16),
        "F.linear": lambda: F.linear(x, w),
        "rms_norm (Triton, no grad)": lambda: rms_norm(x, norm_weight, 1e-6),
        "rms_norm (Triton's own launch path)": lambda: rms_norm(x, norm_weight, 1e-6),
    }
    costs = {}
    for name, op in ops.items():
        _launch.CACHED_LAUNCH = "own launch path" not in name
        for _ in range(50):
            op()
        torch.cuda.synchronize()
        with harness.Stopwatch(device=None) as host:  # host time only: the GPU work is not waited for
            for _ in range(calls):
                op()
        costs[name] = host.seconds / calls * 1e6
        torch.cuda.synchronize()
    _launch.CACHED_LAUNCH = True
    return costs


def launch_ab(step, steps: int) -> dict:
    """Median step time with the cached launch path and with Triton's own, alternating step by step."""
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for index in range(2 * steps):
            _launch.CACHED_LAUNCH = index % 2 == 0
            times[_launch.CACHED_LAUNCH] += harness.time_steps(step, 1)
    finally:
        _launch.CACHED_LAUNCH = True
    return {
        "cached_launch_step_s": statistics.median(times[True]),
        "triton_launch_step_s": statistics.median(times[False]),
        "launch_ab_steps_s": {"cached": times[True], "triton": times[False]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama8b")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--quant", choices=("nf4",))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--host", action="store_true", help="also cProfile one step and list its host syncs")
    parser.add_argument("--launch-ab", type=int, default=0, metavar="N", help="N steps per launch path, alternating")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = harness.build_lora_model(harness.model_config(args.shape, args.layers), "cuda", args.quant)
    model.to(torch.bfloat16)  # as Lightning's bf16-true precision does (PEFT keeps LoRA weights fp32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), device="cuda")
    meta = harness.run_meta()
    rows: list[dict] = []
    if args.host or args.launch_ab:
        meta["launch_us"] = launch_costs()
        print("host us per call:", {k: round(v, 1) for k, v in meta["launch_us"].items()}, flush=True)
    patched = False
    for mode in args.modes:
        if mode != "hf" and not patched:
            meta["patch_report"] = str(patch_model(model))
            patched = True
        if mode == "recompute_half":  # every other decoder layer checkpointed
            harness.set_checkpointing(model, "recompute", checkpoint_fraction=0.5)
        else:
            harness.set_checkpointing(model, mode)
        step = make_step(model, optimizer, input_ids)
        harness.time_steps(step, 2)  # warm-up (Triton autotune / compile)
        seconds = harness.time_steps(step, args.steps)
        memory = harness.PeakMemory("cuda").start()
        row = {"mode": mode, "step_s": statistics.median(seconds), "tokens_per_sec": args.batch * args.seq_len / statistics.median(seconds)}
        row.update(kernel_profile(step, args.top))
        memory.stop()
        row["peak_gib"] = memory.peak_gib
        if args.host:
            row.update(host_profile(step, args.top))
        if args.launch_ab and mode != "hf":
            row.update(launch_ab(step, args.launch_ab))
            print(f"   launch A/B: cached {row['cached_launch_step_s']:.4f} s, Triton's {row['triton_launch_step_s']:.4f} s")
        rows.append(row)
        print(f"== {mode}: step {row['step_s']:.4f} s, {row['tokens_per_sec']:.0f} tok/s, GPU kernels "
              f"{row['gpu_kernel_s']:.4f} s/step, busy {row['gpu_busy']:.2f}, peak {row['peak_gib']:.1f} GiB", flush=True)  # fmt: skip
        for kernel in row["top_kernels"]:
            print(f"   {kernel['s'] * 1e3:8.2f} ms  x{kernel['calls']:<4d} {kernel['name']}")
        for line in row.get("cprofile", []):
            print("   " + line)
        for where, count in row.get("syncs", []):
            print(f"   sync x{count}: {where}")
        harness.write_results(args.out, "Where a training step's time goes", meta, rows, COLUMNS)


if __name__ == "__main__":
    main()
