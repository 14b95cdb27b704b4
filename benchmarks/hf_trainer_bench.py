"""The Hugging Face ``Trainer`` with and without ``lightning_fastft.integrations.hf`` on one shape.

Every variant runs in its own subprocess (child mode), so our instance patches and the allocator
state never leak between variants; the parent loops over them (same lease, same seed: each child
builds the same random bf16 weights on the device, checked by a weight fingerprint) and writes
the results.

    . benchmarks/gpu_env.sh
    python benchmarks/hf_trainer_bench.py                       # llama8b LoRA r16, bs 4, seq 2048
    python benchmarks/hf_trainer_bench.py --shape tiny --device cpu --layers 2 --seq-len 64 --batch-size 2   # smoke run

Variants (``transformers.Trainer``, bf16 autocast on the bf16 weights, AdamW (torch fused), LoRA
r16 alpha16 dropout 0 on q,k,v,o,gate,up,down via ``harness.build_lora_model``, SDPA, random
tokens, no padding):

* ``hf``: the plain Trainer, no activation checkpointing;
* ``hf_gc``: the plain Trainer with ``gradient_checkpointing=True`` (non-reentrant);
* ``fastft``: ``prepare_model(model)`` (kernels, fused LoRA) + ``FastFTCallback().attach(trainer)``;
* ``fastft_recompute``: the same with ``prepare_model(model, checkpointing="recompute")``.

Per variant: the median step time of the timed steps (``harness.Stopwatch`` around each optimizer
step, CUDA synchronised, after ``--warmup-steps``), tokens/s from it, peak allocated memory over
training (``harness.PeakMemory``, reset after the model is built), the loss of every step (the
first is the same model on the same batch in every variant), and ratios to ``hf``.
Results: ``benchmarks/results/hf_trainer_<shape>.json`` and ``.md`` (``harness.write_results``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import torch  # noqa: E402

VARIANTS = ("hf", "hf_gc", "fastft", "fastft_recompute")
COLUMNS = (
    "variant", "step_s", "tokens_per_s", "speedup", "peak_gib", "memory_ratio", "first_loss", "last_loss",
    "fingerprint", "status",
)  # fmt: skip


def _dataset(args: argparse.Namespace, vocab: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    rows = args.batch_size * (args.warmup_steps + args.timed_steps)
    return [{"input_ids": torch.randint(0, vocab, (args.seq_len,), generator=generator)} for _ in range(rows)]


def _collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    input_ids = torch.stack([sample["input_ids"] for sample in samples])
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lightning_fastft.integrations.hf import FastFTCallback, prepare_model

    torch.manual_seed(0)
    config = harness.model_config(args.shape, args.layers)
    model = harness.build_lora_model(config, args.device, quant=None)
    fingerprint = float(sum(p.float().sum() for p in list(model.parameters())[:8]))
    if args.variant.startswith("fastft"):
        checkpointing = "recompute" if args.variant == "fastft_recompute" else None
        model = prepare_model(model, checkpointing=checkpointing)

    stopwatch = harness.Stopwatch(args.device)
    peak = harness.PeakMemory(args.device) if args.device == "cuda" else None

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            stopwatch.start()

        def on_step_end(self, *a, **k):
            stopwatch.stop()

    with tempfile.TemporaryDirectory() as out_dir:
        training_args = TrainingArguments(
            output_dir=out_dir,
            per_device_train_batch_size=args.batch_size,
            max_steps=args.warmup_steps + args.timed_steps,
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            bf16=args.device == "cuda",
            use_cpu=args.device == "cpu",
            gradient_checkpointing=args.variant == "hf_gc",
            gradient_checkpointing_kwargs={"use_reentrant": False},
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            remove_unused_columns=False,
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=_dataset(args, config.vocab_size),
            data_collator=_collate,
            callbacks=[Timer()],
        )
        if args.variant.startswith("fastft"):
            FastFTCallback().attach(trainer)
        if peak is not None:
            peak.start()
        trainer.train()
        if peak is not None:
            peak.stop()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    step_s = stopwatch.median(skip=args.warmup_steps)
    return {
        "variant": args.variant,
        "step_s": step_s,
        "tokens_per_s": args.batch_size * args.seq_len / step_s,
        "peak_gib": peak.peak_gib if peak is not None else None,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "losses": losses,
        "fingerprint": fingerprint,
        "status": "ok",
    }


def spawn(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = Path(handle.name)
    command = [sys.executable, __file__, "--variant", variant, "--json-out", str(result_path)]
    command += ["--shape", args.shape, "--device", args.device, "--seq-len", str(args.seq_len)]
    command += ["--batch-size", str(args.batch_size), "--warmup-steps", str(args.warmup_steps)]
    command += ["--timed-steps", str(args.timed_steps)] + (["--layers", str(args.layers)] if args.layers else [])
    try:
        finished = subprocess.run(command, timeout=args.child_timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "status": f"timeout after {args.child_timeout:.0f} s"}
    if finished.returncode != 0 or not result_path.stat().st_size:
        tail = (finished.stdout + finished.stderr)[-2000:]
        status = "out of memory" if "OutOfMemoryError" in tail or "out of memory" in tail else "error"
        print(f"{variant}: {status}\n{tail}", file=sys.stderr)
        return {"variant": variant, "status": status}
    result = json.loads(result_path.read_text())
    result_path.unlink()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=VARIANTS, help="child mode: run this one variant in this process")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="parent mode")
    parser.add_argument("--shape", choices=sorted(harness.SHAPES), default="llama8b")
    parser.add_argument("--layers", type=int, help="override the number of decoder layers (smoke runs)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--timed-steps", type=int, default=8)
    parser.add_argument("--json-out", type=Path, help="child mode: where to write the result")
    parser.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/hf_trainer_<shape>.json)")
    parser.add_argument("--child-timeout", type=float, default=170.0, help="seconds per variant process")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.variant is not None:
        args.json_out.write_text(json.dumps(run_child(args)))
        return
    rows = [spawn(variant, args) for variant in args.variants]
    base = next((row for row in rows if row["variant"] == "hf" and row["status"] == "ok"), None)
    for row in rows:
        if base is not None and row["status"] == "ok":
            row["speedup"] = base["step_s"] / row["step_s"]
            if base.get("peak_gib") and row.get("peak_gib"):
                row["memory_ratio"] = row["peak_gib"] / base["peak_gib"]
    fingerprints = {row["fingerprint"] for row in rows if row["status"] == "ok"}
    out = args.out or harness.RESULTS_DIR / f"hf_trainer_{args.shape}.json"
    notes = [
        f"bs {args.batch_size}, seq {args.seq_len}, LoRA r{harness.LORA_R}, {args.warmup_steps} warm-up + "
        f"{args.timed_steps} timed steps; speedup = hf step time / variant step time; memory_ratio = peak / hf peak.",
        f"Same weights in every variant: {len(fingerprints) == 1} (fingerprints {sorted(fingerprints)}).",
    ]
    meta = harness.run_meta(shape=args.shape, layers=args.layers, pid=os.getpid())
    harness.write_results(out, f"HF Trainer with and without lightning_fastft ({args.shape})", meta, rows, COLUMNS, notes)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
