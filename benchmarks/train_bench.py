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
bf16 weights built on the device from a config, SDPA attention, same seed and data everywhere):

* ``hf``: HF + PEFT, HF gradient checkpointing (non-reentrant) + ``enable_input_require_grads``;
* ``liger``: as ``hf`` plus Liger-Kernel's ``apply_liger_kernel_to_<model>`` on the instance
  (RoPE, RMSNorm, SwiGLU, fused linear cross entropy);
* ``fastft``: ``strategy=FastFTStrategy(checkpointing="recompute")``;
* ``fastft_offload``: the same with ``checkpointing="offload"``;
* ``fastft_nockpt``: the same without activation checkpointing;
* ``fastft_half``: ``checkpointing="recompute"`` on half of the decoder layers
  (``checkpoint_fraction=0.5``); not in the ``--part`` presets.

Metrics per variant: tokens/s of the median timed step (CUDA-synchronised timer around each
training batch, after the warm-up steps), peak allocated memory over the fit (reset after the
model is built; the built model's own allocation is reported as ``weights_gib``), MFU (model
FLOPs of :func:`lightning_fastft.callbacks.metrics.flops_coefficients`, recomputation not counted,
so MFU ratios equal throughput ratios), the loss of every step, and ratios to ``hf``.
``--max-context`` searches, per variant, the longest sequence (bs 1) that trains two steps, each
probe in a fresh subprocess; an out-of-memory probe is a failure, any other error stops the search.
Results: ``benchmarks/results/train_<name>.json`` and ``.md`` (with the command); plot them with
``benchmarks/plot.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

PRESET_VARIANTS = ("hf", "liger", "fastft", "fastft_offload", "fastft_nockpt")  # those of --part A, B, C
VARIANTS = (*PRESET_VARIANTS, "fastft_half")
# fastft variant -> (checkpointing mode, checkpoint_fraction)
FASTFT_CHECKPOINTING = {
    "fastft": ("recompute", 1.0), "fastft_offload": ("offload", 1.0), "fastft_nockpt": (None, 1.0),
    "fastft_half": ("recompute", 0.5),
}  # fmt: skip
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LIGER_FUNCTIONS = {"llama": "apply_liger_kernel_to_llama", "qwen2": "apply_liger_kernel_to_qwen2"}

SHAPES: dict[str, dict[str, Any]] = {
    "llama8b": {
        "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0,
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
def model_config(shape: str, layers: Optional[int] = None):
    from transformers import AutoConfig

    fields = dict(SHAPES[shape])
    if layers is not None:
        fields["num_hidden_layers"] = layers
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def build_lora_model(config, device: str, quant: Optional[str], lora_r: int = 16):
    """Random-init bf16 causal LM built directly on ``device``, with LoRA (QLoRA for ``quant="nf4"``)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lightning_fastft.qlora import attach_lora, prepare_qlora

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.config.use_cache = False
    lora = {"lora_r": lora_r, "lora_alpha": lora_r, "lora_dropout": 0.0, "target_modules": LORA_TARGETS}
    if quant == "nf4":
        return prepare_qlora(model, quant_type="nf4", **lora)
    if quant is not None:
        raise ValueError(f"quant must be None or 'nf4', got {quant!r}")
    return attach_lora(model, **lora)


def random_token_rows(vocab_size: int, seq_len: int, num_rows: int, seed: int = 0) -> list[dict]:
    """The same rows for every variant: random tokens, every token a target."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, vocab_size, (num_rows, seq_len), generator=generator)
    return [{"input_ids": row, "labels": row.clone()} for row in rows]


def _step_timer_class():
    import lightning.pytorch as pl
    import torch

    class StepTimer(pl.Callback):
        """Seconds and loss of every training batch, CUDA-synchronised on both ends."""

        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.losses: list[float] = []
            self._start = 0.0

        def _sync(self, pl_module) -> None:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._sync(pl_module)
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._sync(pl_module)
            self.seconds.append(time.perf_counter() - self._start)
            self.losses.append(float(outputs["loss"]))

    return StepTimer()


def _prepare_hf_checkpointing(hf_model) -> None:
    hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf_model.enable_input_require_grads()


def _apply_liger(hf_model) -> None:
    import liger_kernel.transformers as liger

    model_type = hf_model.config.model_type
    if model_type not in LIGER_FUNCTIONS:
        raise ValueError(f"no Liger-Kernel patch wired for model_type {model_type!r}")
    getattr(liger, LIGER_FUNCTIONS[model_type])(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True, model=hf_model
    )


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
    if variant == "liger" and importlib.util.find_spec("liger_kernel") is None:
        return {**result, "status": "skipped: liger-kernel missing"}

    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from lightning_fastft.callbacks.metrics import flops_coefficients, peak_flops_for
    from lightning_fastft.module import CausalLMFineTune
    from lightning_fastft.training.checkpointing import checkpointed_layers
    from lightning_fastft._hf import find_hf_model
    from lightning_fastft.strategies import FastFTStrategy

    on_cuda = device.startswith("cuda")
    config = model_config(shape, layers)
    pl.seed_everything(seed, verbose=False)
    build_start = time.perf_counter()
    model = build_lora_model(config, device, quant)
    hf_model = find_hf_model(model)
    if variant in ("hf", "liger"):
        _prepare_hf_checkpointing(hf_model)
    if variant == "liger":
        _apply_liger(hf_model)
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        result["weights_gib"] = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        result["gpu"] = torch.cuda.get_device_name()
    result["build_s"] = time.perf_counter() - build_start

    module = CausalLMFineTune(model=config.to_dict(), lora_r=16, lora_alpha=16, target_modules=list(LORA_TARGETS))
    module.model = model  # built above; configure_model keeps it
    if variant in FASTFT_CHECKPOINTING:
        mode, fraction = FASTFT_CHECKPOINTING[variant]
        strategy: Any = FastFTStrategy(checkpointing=mode, checkpoint_fraction=fraction)
    else:
        strategy = "auto"
    timer = _step_timer_class()
    trainer = pl.Trainer(
        accelerator="gpu" if on_cuda else "cpu",
        devices=1,
        strategy=strategy,
        precision="bf16-true",
        max_steps=warmup_steps + timed_steps,
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    rows = random_token_rows(config.vocab_size, seq_len, warmup_steps + timed_steps, seed)
    trainer.fit(module, DataLoader(rows, batch_size=1))

    timed = timer.seconds[warmup_steps:] or timer.seconds
    step_s = statistics.median(timed)
    result.update(status="ok", step_s=step_s, tokens_per_sec=seq_len / step_s, losses=timer.losses)
    if variant in FASTFT_CHECKPOINTING:
        result["patch_report"] = str(strategy.patch_report)
        result["checkpointed_layers"] = len(checkpointed_layers(module))
    if on_cuda:
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
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
        is_oom = "OutOfMemoryError" in type(error).__name__ or "out of memory" in str(error).lower()
        status = "oom" if is_oom else f"error: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
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


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.0f}"
    if isinstance(value, list):
        return " ".join(f"{v:.3f}" for v in value)
    return str(value)


def markdown_table(rows: list[dict], columns: tuple[str, ...] = TABLE_COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_results(out: Path, title: str, meta: dict, results: list[dict], columns: tuple[str, ...] = TABLE_COLUMNS):
    """``out`` (JSON: meta + results) and ``out`` with ``.md`` (title, command, environment, table)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    environment_line = ", ".join(f"{key} {value}" for key, value in meta["environment"].items())
    markdown = [f"# {title}", "", f"Command: `{meta['command']}`", "", f"Environment: {environment_line}", ""]
    markdown += [markdown_table(results, columns), ""]
    markdown += [
        f"- {r['variant']} ({r['shape']}, seq {r['seq_len']}): " + r["patch_report"].replace("\n", "; ")
        for r in results
        if r.get("patch_report")
    ]
    out.with_suffix(".md").write_text("\n".join(markdown) + "\n")


def run_parent(args: argparse.Namespace, runs: list[dict]) -> list[dict]:
    """Every variant of every run in its own subprocess, within ``--time-budget`` seconds; results written after each."""
    deadline = time.monotonic() + args.time_budget
    meta = {"command": "python " + " ".join(sys.argv), "environment": environment()}
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
    print(markdown_table(results))
    return results


def max_context_search(args: argparse.Namespace) -> list[dict]:
    """Per variant: double the sequence length from ``--seq-len`` until a probe fails, then bisect
    to within ``--granularity`` tokens (or 1/16 of the length); each probe trains 2 steps in a fresh process."""
    deadline = time.monotonic() + args.time_budget
    meta = {"command": "python " + " ".join(sys.argv), "environment": environment()}
    run = {"shape": args.shape, "seq_len": args.seq_len, "quant": args.quant}
    results: list[dict] = []
    for variant in args.variants or VARIANTS:
        fits, fails, probes, error = 0, None, [], None
        length = args.seq_len
        while length is not None and time.monotonic() < deadline - 20:
            timeout = min(args.child_timeout, deadline - time.monotonic())
            probe = spawn_variant(variant, run, args, timeout, seq_len=length, warmup_steps=1, timed_steps=1)
            probes.append({"seq_len": length, "status": probe["status"], "peak_mem_gib": probe.get("peak_mem_gib")})
            print(f"[train_bench] max-context {variant}: seq {length} -> {probe['status']}", flush=True)
            if probe["status"].startswith(("skipped", "error")):
                error = probe["status"]
                break
            if probe["status"] == "ok":
                fits = length
            else:
                fails = length
            if fails is None:
                length = min(2 * length, args.max_seq_len) if length < args.max_seq_len else None
            else:
                step = max(args.granularity, fits // 16)
                middle = (fits + fails) // 2 // args.granularity * args.granularity
                length = middle if fails - fits > step and middle > fits else None
        status = error or ("ok" if fits else "no length fits")
        results.append({"variant": variant, "shape": args.shape, "quant": args.quant, "seq_len": fits or None,
                        "max_seq_len_fits": fits, "first_failing_seq_len": fails, "status": status, "probes": probes})  # fmt: skip
        write_results(args.out, "Longest trainable context (bs 1)", meta, results, MAX_CONTEXT_COLUMNS)
    print(markdown_table(results, MAX_CONTEXT_COLUMNS))
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
        args.out = Path(__file__).parent / "results" / f"train_{name}.json"
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
