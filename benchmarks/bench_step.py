"""One LoRA training step, every implementation side by side: Hugging Face, Liger-Kernel, Unsloth and
lightning_fastft, all loaded from the same saved weights, each in its own process (issue 13, goal 6).

    . benchmarks/gpu_env.sh    # with the Unsloth wheels carried (see below)
    python benchmarks/bench_step.py --shape llama8b --batch 4 1 --quant none \
        --out benchmarks/results/step_llama8b_bf16_h200.json
    python benchmarks/bench_step.py --shape llama8b --batch 4 1 --quant nf4 \
        --variants hf liger unsloth fastft fastft_offload --out benchmarks/results/step_llama8b_nf4_h200.json
    python benchmarks/bench_step.py --shape qwen3_30b_a3b --layers 8 --batch 4 1 --quant none \
        --variants hf unsloth fastft --out benchmarks/results/step_qwen3moe_8l_h200.json
    python benchmarks/bench_step.py --shape tiny --device cpu --batch 2 --seq-len 64 --variants hf fastft   # smoke

The model is built once from the shape's config with random bf16 weights and saved (safetensors, with
the tokenizer of ``examples/assets``) under ``--weights``; every variant then loads those files:

* ``hf``: ``from_pretrained`` (SDPA) + PEFT LoRA, HF gradient checkpointing (non-reentrant);
* ``liger``: ``hf`` + Liger-Kernel's patch of the instance (RoPE, RMSNorm, SwiGLU, fused linear CE);
* ``unsloth``: ``FastLanguageModel.from_pretrained`` + ``get_peft_model(use_gradient_checkpointing="unsloth")``;
* ``fastft``, ``fastft_offload``: ``from_pretrained`` + PEFT LoRA + ``patch_model(checkpointing="recompute" /
  "offload")``; ``fastft_graphs``: ``fastft`` with ``cuda_graphs=True`` (the decoder layers replayed from
  CUDA graphs; the JSON row has their ``captures`` / ``replays``), ``fastft_graphs_auto80`` the same with
  ``fastft_auto80``'s checkpointing;
* ``fastft_auto80``: ``checkpointing="auto"`` with ``memory_budget_gib=80``; ``fastft_auto_unsloth``: with the
  budget set to the peak that ``unsloth`` measured in this run at the same batch and quantisation (or, where
  ``unsloth`` is not among the variants, to ``--memory-budget-gib``: a peak measured in an earlier run).

QLoRA (``--quant nf4``): bitsandbytes NF4 with double quantisation and bf16 compute, quantised at load
(``lightning_fastft.qlora.load_qlora``; Unsloth's ``load_in_4bit=True``). LoRA r16, alpha 16, dropout 0,
on q,k,v,o,gate,up,down (dense) or "all-linear" (MoE: attention + stacked experts, routers frozen).
Plain loop: forward with ``labels = input_ids`` (the same random rows everywhere), backward, AdamW
(lr 1e-4) on the trainable parameters, ``zero_grad(set_to_none=True)``. tokens/s from the median of
``--steps`` synchronised steps after ``--warmup`` (Unsloth compiles in its first steps; with ``--rounds
N`` every variant runs N times, every other round in reverse order, and the timed steps of all rounds
are pooled: host-bound batch-1 steps drift by +-15% over minutes on the GPU machines); peak
allocated (plus the CUDA graph pools' idle bytes, :func:`harness.graph_pool_idle_bytes`) and reserved
memory from the step loop (peaks reset once the model is loaded; the loaded
model is ``weights_gib``); every step's loss, so exactness is visible (B = 0 at LoRA init, so the first
loss is the base model's for every variant).

Unsloth on the GPU machine: carry the ``unsloth`` wheel without its web UI (``studio/``, ``unsloth_cli/``
removed from the zip), ``unsloth_zoo``, ``trl`` (<= 1.15 for unsloth 2026.10.9), ``torchao``,
``cut_cross_entropy``, ``msgspec``, ``tyro``, ``typeguard``, ``hf_transfer``, a ``datasets`` < 5;
``UNSLOTH_DISABLE_STATISTICS=1`` is set here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = (
    "hf", "liger", "unsloth", "fastft", "fastft_graphs", "fastft_offload", "fastft_auto80", "fastft_graphs_auto80",
    "fastft_auto_unsloth",
)  # fmt: skip
FASTFT_VARIANTS = {
    "fastft": {"checkpointing": "recompute"},
    "fastft_graphs": {"checkpointing": "recompute", "cuda_graphs": True},
    "fastft_offload": {"checkpointing": "offload"},
    "fastft_auto80": {"checkpointing": "auto", "memory_budget_gib": 80.0},
    "fastft_graphs_auto80": {"checkpointing": "auto", "memory_budget_gib": 80.0, "cuda_graphs": True},
    "fastft_auto_unsloth": {"checkpointing": "auto"},  # memory_budget_gib: unsloth's measured peak
}
COLUMNS = (
    "quant", "batch", "variant", "status", "tokens_per_sec", "vs_hf", "vs_unsloth", "step_s", "peak_gib",
    "reserved_gib", "weights_gib", "load_s", "first_loss", "last_loss", "plan", "estimated_peak_gib", "budget_gib",
)  # fmt: skip


def shape_fields(shape: str, layers: Optional[int]) -> dict[str, Any]:
    if shape == "qwen3_30b_a3b":
        from moe_bench import QWEN3_30B_A3B

        fields = {"model_type": "qwen3_moe", **QWEN3_30B_A3B}
        if layers is not None:
            fields["num_hidden_layers"] = layers
        return fields
    return harness.model_fields(shape, layers)


def lora_targets(fields: dict[str, Any]) -> Any:
    return "all-linear" if "num_experts" in fields else list(harness.LORA_TARGETS)


# ---------------------------------------------------------------------------------------------
# child modes
# ---------------------------------------------------------------------------------------------
def save_weights(fields: dict[str, Any], weights: Path, seed: int, device: str) -> dict[str, Any]:
    """Random bf16 weights from the config, drawn on ``device``, saved with the demo tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(fields)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    config.use_cache = False
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = weights.with_name(weights.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "examples" / "assets" / name, tmp / name)
    tmp.rename(weights)
    return {"parameters": sum(p.numel() for p in model.parameters()), "save_s": time.perf_counter() - start}


def load_variant(variant: str, weights: Path, quant: Optional[str], seq_len: int, device: str, options: dict):
    """The trainable model of ``variant``, loaded from ``weights``."""
    import torch

    lora = {"lora_r": harness.LORA_R, "lora_alpha": harness.LORA_R, "lora_dropout": 0.0}
    fields = json.loads((weights / "config.json").read_text())
    targets = lora_targets(fields)
    if variant == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(
            model_name=str(weights), max_seq_length=seq_len, dtype=torch.bfloat16, load_in_4bit=quant == "nf4",
            fix_tokenizer=False, local_files_only=True, use_exact_model_name=True,
        )  # fmt: skip
        unsloth_targets = targets if isinstance(targets, list) else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
        return FastLanguageModel.get_peft_model(
            model, r=harness.LORA_R, lora_alpha=harness.LORA_R, lora_dropout=0.0, target_modules=unsloth_targets,
            bias="none", use_gradient_checkpointing="unsloth", random_state=0,
        )  # fmt: skip
    from transformers import AutoModelForCausalLM

    from lightning_fastft._hf import find_hf_model
    from lightning_fastft.qlora import attach_lora, load_qlora

    load = {"device_map": device, "attn_implementation": "sdpa", "local_files_only": True}
    if quant == "nf4":
        model = load_qlora(str(weights), quant_type="nf4", target_modules=targets, **lora, **load)
    else:
        base = AutoModelForCausalLM.from_pretrained(str(weights), dtype=torch.bfloat16, **load)
        model = attach_lora(base, target_modules=targets, **lora)
    hf_model = find_hf_model(model)
    hf_model.config.use_cache = False
    if variant in ("hf", "liger"):
        harness.enable_hf_checkpointing(hf_model)
        if variant == "liger":
            harness.apply_liger(hf_model)
    else:
        from lightning_fastft.patching import patch_model

        patch_model(model, **options)
    return model


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    row: dict[str, Any] = {"variant": args.variant, "quant": args.quant, "batch": args.batch}
    options = dict(FASTFT_VARIANTS.get(args.variant, {}))
    if args.memory_budget_gib is not None:
        options["memory_budget_gib"] = args.memory_budget_gib
    row["budget_gib"] = options.get("memory_budget_gib")
    device = torch.device(args.device)
    start = time.perf_counter()
    model = load_variant(args.variant, Path(args.weights), args.quant, args.seq_len, args.device, options)
    row["load_s"] = time.perf_counter() - start
    vocab = json.loads((Path(args.weights) / "config.json").read_text())["vocab_size"]
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=generator).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    row["trainable"] = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        row["weights_gib"] = torch.cuda.memory_allocated() / harness.GIB
        torch.cuda.reset_peak_memory_stats()
    stopwatch, losses, times = harness.Stopwatch(device), [], []
    for _ in range(args.warmup + args.steps):
        with stopwatch:
            loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times.append(stopwatch.seconds)
        losses.append(float(loss.detach()))
    step = statistics.median(times[args.warmup :])
    row.update(step_s=step, tokens_per_sec=args.batch * args.seq_len / step, losses=losses, step_times=times)
    row.update(first_loss=losses[0], last_loss=losses[-1])
    if on_cuda:
        row["peak_gib"] = (torch.cuda.max_memory_allocated() + harness.graph_pool_idle_bytes()) / harness.GIB
        row["reserved_gib"] = torch.cuda.max_memory_reserved() / harness.GIB
    if "graphs" in args.variant:
        from lightning_fastft.training.cuda_graphs import cuda_graphs_of

        row["cuda_graphs"] = [
            {"captures": s.captures, "replays": s.replays, "eager_reason": s.eager_reason} for s in cuda_graphs_of(model)
        ]
    if "auto" in args.variant:
        from lightning_fastft.training.checkpointing import checkpoint_planner_of

        planner = checkpoint_planner_of(model)
        if planner is not None and planner.plan is not None:
            row["plan"] = "/".join(str(planner.plan.count(mode)) for mode in (None, "recompute", "offload"))
            row["estimated_peak_gib"] = planner.plan.peak_bytes / harness.GIB
    return {**row, "status": "ok"}


# ---------------------------------------------------------------------------------------------
# parent: save once, one subprocess per (quant, batch, variant)
# ---------------------------------------------------------------------------------------------
def child(argv: list[str], timeout: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = handle.name
    env = {**os.environ, "UNSLOTH_DISABLE_STATISTICS": "1", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, __file__, *argv, "--result", result_path]
    start = time.perf_counter()
    try:
        process = subprocess.run(command, env=env, timeout=timeout, capture_output=True, text=True)
        output = process.stdout + process.stderr
        print(output[-3000:], flush=True)
        result = json.loads(Path(result_path).read_text() or "{}")
        if not result:
            result = {"status": f"failed (exit {process.returncode}): {output.strip().splitlines()[-1:]}"}
    except subprocess.TimeoutExpired as timed_out:
        output = "".join(part if isinstance(part, str) else (part or b"").decode(errors="replace")
                         for part in (timed_out.stdout, timed_out.stderr))  # fmt: skip
        print(output[-3000:], flush=True)
        result = {"status": f"timed out after {timeout:.0f} s"}
    finally:
        Path(result_path).unlink(missing_ok=True)
    result["wall_s"] = time.perf_counter() - start
    return result


def parent(args: argparse.Namespace) -> None:
    fields = shape_fields(args.shape, args.layers)
    weights = Path(args.weights or tempfile.gettempdir()) / f"fastft_bench_{args.shape}_{args.layers or 'all'}"
    meta = harness.run_meta(shape=args.shape, fields=fields, seq_len=args.seq_len, warmup=args.warmup, steps=args.steps)
    if not weights.exists():
        meta["saved"] = child(["--save", "--shape", args.shape, *_layers(args), "--weights", str(weights),
                               "--device", args.device], args.timeout)  # fmt: skip
        print("saved", meta["saved"], flush=True)
    rows: list[dict[str, Any]] = []
    for quant in args.quant:
        for batch in args.batch:
            group: dict[str, dict] = {}
            for round_index in range(args.rounds):
                order = args.variants if round_index % 2 == 0 else args.variants[::-1]
                for variant in order:
                    argv = ["--variant", variant, "--quant", quant, "--batch", str(batch), "--seq-len", str(args.seq_len),
                            "--weights", str(weights), "--device", args.device, "--warmup", str(args.warmup),
                            "--steps", str(args.steps)]  # fmt: skip
                    if variant == "fastft_auto_unsloth":
                        peak = group.get("unsloth", {}).get("peak_gib", args.memory_budget_gib)
                        if peak is None:
                            group[variant] = {"variant": variant, "quant": quant, "batch": batch,
                                              "status": "skipped: no unsloth peak"}  # fmt: skip
                            continue
                        argv += ["--memory-budget-gib", f"{peak:.3f}"]
                    print(f"== {quant} bs {batch} {variant} (round {round_index + 1})", flush=True)
                    row = {**child(argv, args.timeout), "variant": variant, "quant": quant, "batch": batch}
                    group[variant] = pool_rounds(group.get(variant), row, args.warmup, batch * args.seq_len)
            rows += [group[variant] for variant in args.variants if variant in group]
            for row in group.values():
                for base in ("hf", "unsloth"):
                    reference = group.get(base, {}).get("tokens_per_sec")
                    if reference and row.get("tokens_per_sec"):
                        row[f"vs_{base}"] = row["tokens_per_sec"] / reference
            print(harness.markdown_table(rows, COLUMNS), flush=True)
            write(args, fields, meta, rows)  # after every group: a run cut short keeps what it measured


def pool_rounds(earlier: Optional[dict], row: dict, warmup: int, tokens: int) -> dict:
    """``row`` joined with the same variant's row of the earlier rounds: the timed steps of every round
    pooled (``step_s`` and tokens/s from their median), ``round_step_s`` each round's median, the
    highest peaks. The first round that did not finish stands for the variant."""
    if earlier is not None and earlier["status"] != "ok":
        return earlier
    if row["status"] != "ok":
        return row
    timed = row["step_times"][warmup:]
    if earlier is None:
        return {**row, "timed_step_times": timed, "round_step_s": [row["step_s"]]}
    timed = earlier["timed_step_times"] + timed
    pooled = {**earlier, "timed_step_times": timed, "round_step_s": earlier["round_step_s"] + [row["step_s"]]}
    step = statistics.median(timed)
    pooled.update(step_s=step, tokens_per_sec=tokens / step)
    for key in ("peak_gib", "reserved_gib"):
        if key in row:
            pooled[key] = max(earlier[key], row[key])
    return pooled


def write(args: argparse.Namespace, fields: dict[str, Any], meta: dict, rows: list[dict]) -> None:
    rounds = f" in each of {args.rounds} rounds (every other round in reverse order), pooled" if args.rounds > 1 else ""
    notes = [
        f"{args.shape} ({fields.get('num_hidden_layers')} layers), seq {args.seq_len}, LoRA r16 on "
        f"{lora_targets(fields)}; median of {args.steps} steps after {args.warmup} warm-up steps{rounds}; every variant in "
        "its own process, loaded from the same saved weights. vs_hf / vs_unsloth: tokens/s ratios at the same "
        "quant and batch. peak/reserved: max allocated/reserved over the step loop (absolute).",
        "", "Losses per step:", "",
    ]  # fmt: skip
    notes += [f"* {r['quant']} bs {r['batch']} {r['variant']}: {[round(x, 4) for x in r.get('losses', [])]}" for r in rows]
    harness.write_results(Path(args.out), "One LoRA training step: HF, Liger, Unsloth, fastft (same weights, same lease)",
                          meta, rows, COLUMNS, notes)  # fmt: skip


def _layers(args: argparse.Namespace) -> list[str]:
    return [] if args.layers is None else ["--layers", str(args.layers)]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama8b", choices=(*harness.SHAPES, "qwen3_30b_a3b"))
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 1])
    parser.add_argument("--quant", nargs="+", default=["none"], choices=("none", "nf4"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=1, help="run the variants this many times, every other round in "
                        "reverse order, and pool their timed steps (host-bound runs drift over minutes)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--weights", default=None, help="folder for the saved weights (default: the temp folder)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per variant process")
    parser.add_argument("--out", default=str(harness.RESULTS_DIR / "step_compare"))
    # child mode
    parser.add_argument("--save", action="store_true")
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--memory-budget-gib", type=float, default=None, help="fastft_auto_unsloth's budget where "
                        "unsloth does not run in the same call (it takes unsloth's measured peak where it does)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result", default=None)
    args = parser.parse_args(argv)
    if args.result is None:
        return parent(args)
    try:
        if args.save:
            result = save_weights(shape_fields(args.shape, args.layers), Path(args.weights), args.seed, args.device)
        else:
            args.quant = None if args.quant == ["none"] or args.quant == "none" else "nf4"
            args.batch = args.batch[0] if isinstance(args.batch, list) else args.batch
            result = run_variant(args)
    except Exception as error:  # noqa: BLE001 - reported in the table, the other variants go on
        traceback.print_exc()
        oom = harness.is_out_of_memory(error)
        result = {"status": ("out of memory: " if oom else "error: ") + f"{type(error).__name__}: {error}"[:300]}
    Path(args.result).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
