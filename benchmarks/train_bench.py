"""End-to-end training benchmark: one LightningModule through ``Trainer.fit`` under each variant.

Every variant runs in its own subprocess (child mode), so patches (Liger's, ours) and allocator
state never leak between variants; the parent loops over them and writes the results.

    . benchmarks/gpu_env.sh
    python benchmarks/train_bench.py --part A        # llama8b bf16 LoRA, seq 2048, all variants
    python benchmarks/train_bench.py --part B        # llama8b QLoRA (nf4), seq 2048
    python benchmarks/train_bench.py --part C        # llama8b bf16 LoRA, long context (seq 8192)
    python benchmarks/train_bench.py --part D        # qwen7b and llama1b bf16 LoRA, seq 2048
    python benchmarks/train_bench.py --part E        # llama8b QLoRA, long context (seq 16384)
    python benchmarks/train_bench.py --max-context --shape llama8b --quant nf4 --variants hf fastft_offload
    python benchmarks/train_bench.py --shape tiny --device cpu --layers 2 --seq-len 64   # CPU smoke run

Variants (bs 1, LoRA r16 alpha16 dropout 0 on q,k,v,o,gate,up,down, bf16-true precision, random
bf16 weights built on the device from a config, SDPA attention, same seed and data everywhere). The
model is ``CausalLMFineTune(model=<config dict>, lora_r=16, ..., quant_type=<quant>)``, built by the
module's ``configure_model`` under the Trainer (on the device, in bf16), so its saved
hyper-parameters describe the model trained:

* ``hf``: HF + PEFT, HF gradient checkpointing (non-reentrant) + ``enable_input_require_grads``;
* ``liger``: as ``hf`` plus Liger-Kernel's ``apply_liger_kernel_to_<model>`` on the instance
  (RoPE, RMSNorm, SwiGLU, fused linear cross entropy);
* ``fastft``: ``strategy=FastFTStrategy(checkpointing="recompute")``;
* ``fastft_offload``: the same with ``checkpointing="offload"``;
* ``fastft_nockpt``: the same without activation checkpointing;
* ``fastft_half``: ``checkpointing="recompute"`` on half of the decoder layers
  (``checkpoint_fraction=0.5``); not in the ``--part`` presets.

Metrics per variant: tokens/s of the median timed step (CUDA-synchronised timer around each
training batch, after the warm-up steps), peak allocated memory over the fit (reset at
``on_fit_start``, once the model is built, set up and the baseline's HF checkpointing / Liger patches
applied; the model's own allocation then is reported as ``weights_gib``, the seconds from
``Trainer.fit`` to that point as ``build_s``), MFU (model
FLOPs of :func:`lightning_fastft.callbacks.metrics.flops_coefficients`, recomputation not counted,
so MFU ratios equal throughput ratios), the loss of every step, and ratios to ``hf``.
``--max-context`` searches, per variant, the longest sequence (bs 1) that trains two steps, each
probe in a fresh subprocess (``harness.search_longest``: doubling from ``--seq-len``, then bisection);
an out-of-memory probe is a failure, any other error stops the search.
Results: ``benchmarks/results/train_<name>.json`` and ``.md`` (with the command; ``harness.write_results``);
plot them with ``benchmarks/plot.py``; the README's table: ``benchmarks/readme_tables.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import LORA_R, LORA_TARGETS, SHAPES  # noqa: E402

PRESET_VARIANTS = ("hf", "liger", "fastft", "fastft_offload", "fastft_nockpt")  # those of --part A, B, C
VARIANTS = (*PRESET_VARIANTS, "fastft_half")
# fastft variant -> (checkpointing mode, checkpoint_fraction)
FASTFT_CHECKPOINTING = {
    "fastft": ("recompute", 1.0), "fastft_offload": ("offload", 1.0), "fastft_nockpt": (None, 1.0),
    "fastft_half": ("recompute", 0.5),
}  # fmt: skip

# one preset = the runs of one <10-minute device call
PARTS: dict[str, list[dict[str, Any]]] = {
    "A": [{"shape": "llama8b", "seq_len": 2048, "quant": None, "variants": PRESET_VARIANTS}],
    "B": [{"shape": "llama8b", "seq_len": 2048, "quant": "nf4", "variants": PRESET_VARIANTS}],
    "C": [{"shape": "llama8b", "seq_len": 8192, "quant": None, "variants": PRESET_VARIANTS}],
    "D": [
        {"shape": "qwen7b", "seq_len": 2048, "quant": None, "variants": ("hf", "liger", "fastft")},
        {"shape": "llama1b", "seq_len": 2048, "quant": None, "variants": ("hf", "liger", "fastft")},
    ],
    "E": [{"shape": "llama8b", "seq_len": 16384, "quant": "nf4", "variants": ("hf", "liger", "fastft", "fastft_offload")}],
}

TABLE_COLUMNS = (
    "shape", "quant", "seq_len", "variant", "status", "tokens_per_sec", "speedup_vs_hf",
    "peak_mem_gib", "mem_vs_hf", "weights_gib", "mfu", "step_s", "losses",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# child mode: one variant, one process
# ---------------------------------------------------------------------------------------------
def random_token_rows(vocab_size: int, seq_len: int, num_rows: int, seed: int = 0) -> list[dict]:
    """The same rows for every variant: random tokens, every token a target."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, vocab_size, (num_rows, seq_len), generator=generator)
    return [{"input_ids": row, "labels": row.clone()} for row in rows]


def _bench_callback_class():
    import lightning.pytorch as pl

    class BenchCallback(pl.Callback):
        """At ``on_fit_start`` (model built and set up, before the first step): the baseline's HF
        gradient checkpointing and Liger patches, then the weights' allocation and a peak-memory
        reset. Around every training batch: a synchronised :class:`harness.Stopwatch` lap and the loss."""

        def __init__(self, variant: str, result: dict[str, Any]) -> None:
            self.variant, self.result = variant, result
            self.fit_start = 0.0  # set just before Trainer.fit
            self.losses: list[float] = []
            self.stopwatch: Optional[harness.Stopwatch] = None
            self.memory: Optional[harness.PeakMemory] = None

        def on_fit_start(self, trainer, pl_module) -> None:
            from lightning_fastft._hf import find_hf_model

            hf_model = find_hf_model(pl_module.model)
            if self.variant in ("hf", "liger"):
                harness.enable_hf_checkpointing(hf_model)
            if self.variant == "liger":
                harness.apply_liger(hf_model)
            self.stopwatch = harness.Stopwatch(pl_module.device)
            if pl_module.device.type == "cuda":
                import torch

                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                self.result["weights_gib"] = torch.cuda.memory_allocated() / harness.GIB
                self.memory = harness.PeakMemory(pl_module.device).start()
            self.result["build_s"] = time.perf_counter() - self.fit_start

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.stopwatch.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.stopwatch.stop()
            self.losses.append(float(outputs["loss"]))

    return BenchCallback


def run_variant(
    variant: str,
    *,
    shape: str,
    seq_len: int,
    quant: Optional[str] = None,
    layers: Optional[int] = None,
    device: str = "cuda",
    warmup_steps: int = 3,
    timed_steps: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Train ``warmup_steps + timed_steps`` steps of ``variant`` in this process; returns its metrics.

    The Liger variant patches transformers module globals: run it in a fresh process (child mode).
    """
    result: dict[str, Any] = {
        "variant": variant, "shape": shape, "layers": layers, "seq_len": seq_len, "quant": quant,
        "device": device, "warmup_steps": warmup_steps, "timed_steps": timed_steps,
    }  # fmt: skip
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if quant not in (None, "nf4"):
        raise ValueError(f"quant must be None or 'nf4', got {quant!r}")
    if variant == "liger" and importlib.util.find_spec("liger_kernel") is None:
        return {**result, "status": "skipped: liger-kernel missing"}

    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from lightning_fastft.callbacks.metrics import flops_coefficients, peak_flops_for
    from lightning_fastft.module import CausalLMFineTune
    from lightning_fastft.strategies import FastFTStrategy
    from lightning_fastft.training.checkpointing import checkpointed_layers

    on_cuda = device.startswith("cuda")
    fields = harness.model_fields(shape, layers)
    if on_cuda:
        result["gpu"] = torch.cuda.get_device_name()
    pl.seed_everything(seed, verbose=False)
    module = CausalLMFineTune(
        model=fields, lora_r=LORA_R, lora_alpha=LORA_R, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
        quant_type=quant, init_seed=seed,
    )  # fmt: skip
    if variant in FASTFT_CHECKPOINTING:
        mode, fraction = FASTFT_CHECKPOINTING[variant]
        strategy: Any = FastFTStrategy(checkpointing=mode, checkpoint_fraction=fraction)
    else:
        strategy = "auto"
    callback = _bench_callback_class()(variant, result)
    trainer = pl.Trainer(
        accelerator="gpu" if on_cuda else "cpu",
        devices=1,
        strategy=strategy,
        precision="bf16-true",
        max_steps=warmup_steps + timed_steps,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    rows = random_token_rows(fields["vocab_size"], seq_len, warmup_steps + timed_steps, seed)
    callback.fit_start = time.perf_counter()
    trainer.fit(module, DataLoader(rows, batch_size=1))

    step_s = callback.stopwatch.median(skip=warmup_steps)
    result.update(status="ok", step_s=step_s, tokens_per_sec=seq_len / step_s, losses=callback.losses)
    if variant in FASTFT_CHECKPOINTING:
        result["patch_report"] = str(strategy.patch_report)
        result["checkpointed_layers"] = len(checkpointed_layers(module))
    if on_cuda:
        result["peak_mem_gib"] = callback.memory.stop() / harness.GIB
        peak_flops = peak_flops_for(result["gpu"])
        fixed, per_position = flops_coefficients(module, checkpoint_fraction=0.0)
        if peak_flops:
            result["mfu"] = (fixed + per_position * seq_len) * result["tokens_per_sec"] / peak_flops
    return result


def run_child(args: argparse.Namespace) -> None:
    """Child mode: run one variant, write its result (or its failure) to ``--json-out``."""
    try:
        result = run_variant(
            args.variant, shape=args.shape, seq_len=args.seq_len, quant=args.quant, layers=args.layers,
            device=args.device, warmup_steps=args.warmup_steps, timed_steps=args.timed_steps,
        )  # fmt: skip
    except Exception as error:  # noqa: BLE001 - the failure is the result
        traceback.print_exc()
        status = "oom" if harness.is_out_of_memory(error) else f"error: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        result = {"variant": args.variant, "shape": args.shape, "seq_len": args.seq_len, "quant": args.quant, "status": status}
    Path(args.json_out).write_text(json.dumps(result, indent=1))


# ---------------------------------------------------------------------------------------------
# parent mode: loop over variants in subprocesses, write JSON + Markdown
# ---------------------------------------------------------------------------------------------
def spawn_variant(variant: str, run: dict[str, Any], args: argparse.Namespace, timeout: float, **overrides) -> dict:
    """Run one variant in a fresh ``python train_bench.py --variant ...`` process; its result dict."""
    settings = {"shape": run["shape"], "seq_len": run["seq_len"], "quant": run.get("quant"), "layers": args.layers,
                "device": args.device, "warmup_steps": args.warmup_steps, "timed_steps": args.timed_steps, **overrides}  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        json_out = Path(scratch) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--json-out", str(json_out)]
        for key, value in settings.items():
            if value is not None:
                command += [f"--{key.replace('_', '-')}", str(value)]
        try:
            subprocess.run(command, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"variant": variant, **settings, "status": f"error: timed out after {timeout:.0f} s"}
        if not json_out.exists():
            return {"variant": variant, **settings, "status": "error: child crashed without a result"}
        return json.loads(json_out.read_text())


def add_ratios(results: list[dict]) -> None:
    """``speedup_vs_hf`` and ``mem_vs_hf`` against the ``hf`` row of the same shape/quant/seq_len."""
    baselines = {
        (r["shape"], r.get("quant"), r["seq_len"]): r for r in results if r["variant"] == "hf" and r["status"] == "ok"
    }
    for row in results:
        base = baselines.get((row["shape"], row.get("quant"), row["seq_len"]))
        if base is None or row["status"] != "ok":
            continue
        row["speedup_vs_hf"] = row["tokens_per_sec"] / base["tokens_per_sec"]
        if row.get("peak_mem_gib") and base.get("peak_mem_gib"):
            row["mem_vs_hf"] = row["peak_mem_gib"] / base["peak_mem_gib"]


def patch_notes(results: list[dict]) -> list[str]:
    """One Markdown bullet per row with a patching report."""
    return [
        f"- {r['variant']} ({r['shape']}, seq {r['seq_len']}): " + r["patch_report"].replace("\n", "; ")
        for r in results
        if r.get("patch_report")
    ]


def write_results(out: Path, title: str, meta: dict, results: list[dict], columns: tuple[str, ...] = TABLE_COLUMNS):
    """``harness.write_results`` with the patching reports as notes under the table."""
    harness.write_results(out, title, meta, results, columns, notes=patch_notes(results))


def run_parent(args: argparse.Namespace, runs: list[dict]) -> list[dict]:
    """Every variant of every run in its own subprocess, within ``--time-budget`` seconds; results written after each."""
    deadline = time.monotonic() + args.time_budget
    meta = harness.run_meta()
    results: list[dict] = []
    for run in runs:
        for variant in args.variants or run["variants"]:
            remaining = deadline - time.monotonic()
            if remaining < 20:
                row = {"variant": variant, "shape": run["shape"], "seq_len": run["seq_len"], "quant": run.get("quant")}
                results.append({**row, "status": "skipped: time budget spent"})
                continue
            print(f"[train_bench] {run['shape']} seq {run['seq_len']} quant {run.get('quant')}: {variant}", flush=True)
            results.append(spawn_variant(variant, run, args, timeout=min(args.child_timeout, remaining)))
            add_ratios(results)
            write_results(args.out, "Training benchmark", meta, results)
    print(harness.markdown_table(results, TABLE_COLUMNS))
    return results


def max_context_search(args: argparse.Namespace) -> list[dict]:
    """Per variant, :func:`harness.search_longest` from ``--seq-len``: double until a probe fails, then
    bisect to within ``--granularity`` tokens (or 1/16 of the length); each probe trains 2 steps in a fresh process."""
    deadline = time.monotonic() + args.time_budget
    meta = harness.run_meta()
    run = {"shape": args.shape, "seq_len": args.seq_len, "quant": args.quant}
    results: list[dict] = []
    for variant in args.variants or VARIANTS:

        def probe(length: int, variant: str = variant) -> dict:
            timeout = min(args.child_timeout, deadline - time.monotonic())
            result = spawn_variant(variant, run, args, timeout, seq_len=length, warmup_steps=1, timed_steps=1)
            print(f"[train_bench] max-context {variant}: seq {length} -> {result['status']}", flush=True)
            return {"status": result["status"], "peak_mem_gib": result.get("peak_mem_gib")}

        found = harness.search_longest(
            probe, start=args.seq_len, high=args.max_seq_len, granularity=args.granularity,
            tolerance=lambda fits: max(args.granularity, fits // 16), deadline=deadline - 20,
        )  # fmt: skip
        fits = found["max_seq_len_fits"]
        status = found["error"] or ("ok" if fits else "no length fits")
        results.append({"variant": variant, "shape": args.shape, "quant": args.quant, "seq_len": fits or None,
                        "max_seq_len_fits": fits, "first_failing_seq_len": found["first_failing_seq_len"],
                        "status": status, "probes": found["probes"]})  # fmt: skip
        write_results(args.out, "Longest trainable context (bs 1)", meta, results, MAX_CONTEXT_COLUMNS)
    print(harness.markdown_table(results, MAX_CONTEXT_COLUMNS))
    return results


MAX_CONTEXT_COLUMNS = ("shape", "quant", "variant", "status", "max_seq_len_fits", "first_failing_seq_len")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=sorted(PARTS), help="a preset of runs that fits one 10-minute device call")
    parser.add_argument("--variant", choices=VARIANTS, help="child mode: run this one variant in this process")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="parent mode: only these variants")
    parser.add_argument("--max-context", action="store_true", help="binary-search the longest trainable seq per variant")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama8b")
    parser.add_argument("--layers", type=int, help="override the number of decoder layers (smoke tests)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per row (bs 1); start length of --max-context")
    parser.add_argument("--quant", choices=("nf4",), help="QLoRA: 4-bit NF4 base via prepare_qlora")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--timed-steps", type=int, default=5)
    parser.add_argument("--json-out", type=Path, help="child mode: where to write the result")
    parser.add_argument("--out", type=Path, help="parent mode: results JSON (default benchmarks/results/train_<name>.json)")
    parser.add_argument("--time-budget", type=float, default=540.0, help="parent: seconds for all children together")
    parser.add_argument("--child-timeout", type=float, default=240.0, help="parent: seconds per child process")
    parser.add_argument("--max-seq-len", type=int, default=131072, help="--max-context: largest length probed")
    parser.add_argument("--granularity", type=int, default=1024, help="--max-context: lengths are multiples of this")
    args = parser.parse_args(argv)
    if args.variant is not None and args.json_out is None:
        parser.error("--variant (child mode) needs --json-out")
    if args.out is None:
        name = f"part{args.part}" if args.part else f"{args.shape}{'_' + args.quant if args.quant else ''}"
        name = f"max_context_{name}" if args.max_context else name
        args.out = harness.RESULTS_DIR / f"train_{name}.json"
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.variant is not None:
        run_child(args)
    elif args.max_context:
        max_context_search(args)
    else:
        runs = PARTS[args.part] if args.part else [{"shape": args.shape, "seq_len": args.seq_len, "quant": args.quant, "variants": VARIANTS}]
        run_parent(args, runs)


if __name__ == "__main__":
    main()
