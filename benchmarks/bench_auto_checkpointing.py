"""GPU benchmark: ``checkpointing="auto"`` against the fixed modes, one model, one process (issue 13, goal 3).

    . benchmarks/gpu_env.sh
    python benchmarks/bench_auto_checkpointing.py --out benchmarks/results/auto_checkpointing_h200.json

Model: the Llama-3-8B shape (``harness.SHAPES["llama8b"]``), random bf16 weights built on the GPU,
PEFT LoRA r16 on all 7 linears cast to bf16 (as Lightning's bf16-true does), every fastft kernel
patch; batch 4 x 2048 tokens, the same rows every step. Plain loop: forward with labels, backward,
AdamW (lr 1e-5, fresh per variant), ``zero_grad(set_to_none=True)``.

The model is built once; each variant re-applies activation checkpointing to it
(``apply_activation_checkpointing``; ``none`` removes it) and restores the LoRA weights of the
start, so every variant's first loss is the same step from the same weights. Variants (``--variants``):
``recompute``, ``offload``, ``auto_80`` (``checkpointing="auto"``, ``memory_budget_gib=80``),
``auto_17.7`` (Unsloth's measured peak at this shape, issue 13), ``none``; also ``auto`` (the
default budget). Per variant: ``--warmup`` steps (the auto plan is made in the first), then the
median of ``--steps`` timed steps; tokens/s = 8192 / median step; peak allocated and reserved
memory over all its steps (the caching allocator emptied and the peaks reset before each
variant); for ``auto*`` the plan, its estimated peak and the measured bytes per layer.
Writes ``<out>`` (JSON) and ``.md`` (``harness.write_results``); about 2-3 minutes on an H200.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from lightning_fastft.patching import patch_model  # noqa: E402
from lightning_fastft.training.checkpointing import (  # noqa: E402
    apply_activation_checkpointing,
    checkpoint_planner_of,
    remove_activation_checkpointing,
)

BUDGETS = {"auto": None, "auto_80": 80.0, "auto_17.7": 17.7}
VARIANTS = ("recompute", "offload", "none", *BUDGETS)
DEFAULT_VARIANTS = ("recompute", "offload", "auto_80", "auto_17.7", "none")
COLUMNS = (
    "variant", "budget_gib", "plan", "step_s", "tokens_per_sec", "peak_allocated_gib", "peak_reserved_gib",
    "estimated_peak_gib", "first_loss", "error",
)  # fmt: skip


def set_variant(model: torch.nn.Module, variant: str) -> None:
    remove_activation_checkpointing(model)
    if variant in BUDGETS:
        apply_activation_checkpointing(model, "auto", memory_budget_gib=BUDGETS[variant])
    elif variant != "none":
        apply_activation_checkpointing(model, variant)


def run_variant(model, start_weights, input_ids, variant: str, warmup: int, steps: int) -> dict:
    row: dict = {"variant": variant, "budget_gib": BUDGETS.get(variant)}
    device = input_ids.device
    with torch.no_grad():
        for parameter, value in zip(start_weights[0], start_weights[1]):
            parameter.copy_(value)
    set_variant(model, variant)
    optimizer = torch.optim.AdamW(start_weights[0], lr=1e-5)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    stopwatch = harness.Stopwatch(device)
    losses = []
    try:
        for _ in range(warmup + steps):
            with stopwatch:
                loss = model(input_ids=input_ids, labels=input_ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM"
    except ValueError as error:  # the auto plan found the budget too small
        row["error"] = str(error)
    finally:
        del optimizer
    if device.type == "cuda":
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / harness.GIB
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / harness.GIB
    if "error" not in row:
        row["step_s"] = stopwatch.median(skip=warmup)
        row["tokens_per_sec"] = input_ids.numel() / row["step_s"]
        row["step_times_s"] = stopwatch.laps
        row["first_loss"] = losses[0]
        row["losses"] = losses
    planner = checkpoint_planner_of(model)
    if planner is not None and planner.plan is not None:
        plan = planner.plan
        row["plan"] = "/".join(str(plan.count(mode)) for mode in (None, "recompute", "offload"))
        row["plan_text"] = str(plan)
        row["estimated_peak_gib"] = plan.peak_bytes / harness.GIB
        row["fixed_gib"] = plan.fixed_bytes / harness.GIB
        row["budget_used_gib"] = plan.budget_bytes / harness.GIB
        row["layer_saved_gib"] = planner.measured[0].saved_bytes / harness.GIB
        row["layer_input_gib"] = planner.measured[0].input_bytes / harness.GIB
        row["modes"] = [mode or "none" for mode in plan.modes[0]]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama8b")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    started = time.monotonic()
    torch.manual_seed(0)
    model = harness.build_lora_model(harness.model_config(args.shape, args.layers), args.device, quant=None)
    model.to(torch.bfloat16)  # as Lightning's bf16-true precision does (PEFT keeps LoRA weights fp32)
    model.train()
    meta = harness.run_meta(patch_report=str(patch_model(model)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    start_weights = (trainable, [p.detach().clone() for p in trainable])
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), device=args.device)
    meta["build_s"] = time.monotonic() - started
    print(f"model built and patched in {meta['build_s']:.0f} s", flush=True)
    rows = []
    for variant in args.variants:
        row = run_variant(model, start_weights, input_ids, variant, args.warmup, args.steps)
        rows.append(row)
        print(
            f"== {variant}: {harness.cell(row.get('tokens_per_sec'))} tok/s, step {harness.cell(row.get('step_s'))} s, "
            f"peak {harness.cell(row.get('peak_allocated_gib'))} GiB allocated / "
            f"{harness.cell(row.get('peak_reserved_gib'))} reserved {row.get('error', '')}",
            flush=True,
        )
        if "plan_text" in row:
            print(f"   {row['plan_text']}; per layer {row['layer_saved_gib']:.3f} GiB saved, "
                  f"{row['layer_input_gib']:.3f} GiB input; modes bottom up: {' '.join(row['modes'])}", flush=True)  # fmt: skip
        remove_activation_checkpointing(model)
        gc.collect()
    meta["total_s"] = time.monotonic() - started
    reference = next((row for row in rows if row["variant"] == "none" and "tokens_per_sec" in row), None)
    notes = [
        f"bs {args.batch_size} x seq {args.seq_len}, {args.shape}, LoRA r{harness.LORA_R} on all 7 linears, bf16; "
        f"median of {args.steps} steps after {args.warmup} warm-up steps; total run {meta['total_s']:.0f} s.",
        "plan = decoder layers none/recompute/offload; estimated_peak_gib = the planner's estimate "
        "(compare with peak_allocated_gib).",
        "",
    ]
    notes += [f"* {row['variant']}: {row['plan_text']}" for row in rows if "plan_text" in row]
    if reference is not None:
        notes += ["", "tok/s relative to none: " + ", ".join(
            f"{row['variant']} {row['tokens_per_sec'] / reference['tokens_per_sec']:.3f}" for row in rows
            if "tokens_per_sec" in row)]  # fmt: skip
    harness.write_results(
        args.out, "checkpointing='auto' against the fixed modes", meta, rows, COLUMNS, notes, integers_from=100
    )
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} in {meta['total_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
