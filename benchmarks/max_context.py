"""Longest sequence (batch 1) that trains one step of 8B-shaped QLoRA on this GPU, per variant.

    python benchmarks/max_context.py --variants hf fastft_offload --out benchmarks/results/max_context_8b_qlora.json

One model is built (Llama-3-8B shape, random NF4 base, LoRA r16 on all linears) and reused:
``hf`` runs first (HF gradient checkpointing, HF loss), then the model is patched for the fastft
variants (``fastft``: our recompute checkpointing; ``fastft_offload``: layer inputs in pinned host
memory). ``liger`` (HF gradient checkpointing plus Liger-Kernel's patches, which change
transformers' module globals) must be searched alone, in its own process. Each variant bisects
over multiples of ``--granularity`` in [low, high]; a probe is one forward+backward;
out-of-memory means "does not fit". A per-variant time budget stops the search early,
reporting the bracket found so far.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from offload import set_mode  # noqa: E402
from train_bench import _apply_liger, build_lora_model, model_config  # noqa: E402

from lightning_fastft.patching import patch_model  # noqa: E402
from lightning_fastft._hf import find_hf_model  # noqa: E402

CHECKPOINTING = {"hf": "hf", "liger": "hf", "fastft": "recompute", "fastft_offload": "offload"}


def fits(model: torch.nn.Module, seq_len: int) -> bool:
    input_ids = torch.randint(0, model.config.vocab_size, (1, seq_len), device="cuda")
    try:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        torch.cuda.synchronize()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del input_ids
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()


def search(model, low: int, high: int, granularity: int, budget_s: float) -> dict:
    start, probes = time.perf_counter(), []
    lo, hi, best, failed = low // granularity, high // granularity, 0, None
    while lo <= hi and time.perf_counter() - start < budget_s:
        middle = (lo + hi) // 2
        torch.cuda.reset_peak_memory_stats()
        probe_start = time.perf_counter()
        ok = fits(model, middle * granularity)
        probes.append({"seq_len": middle * granularity, "fits": ok, "seconds": time.perf_counter() - probe_start,
                       "peak_gib": torch.cuda.max_memory_allocated() / 2**30})  # fmt: skip
        print(probes[-1], flush=True)
        if ok:
            best, lo = middle * granularity, middle + 1
        else:
            failed, hi = middle * granularity, middle - 1
    return {"longest_fitting": best, "shortest_failing": failed, "complete": lo > hi, "probes": probes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", default=["hf", "fastft_offload"], choices=list(CHECKPOINTING))
    parser.add_argument("--low", type=int, default=8192)
    parser.add_argument("--high", type=int, default=196608)
    parser.add_argument("--granularity", type=int, default=4096)
    parser.add_argument("--budget-s", type=float, default=240.0, help="per variant")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if "hf" in args.variants and args.variants[0] != "hf":
        parser.error("hf must come first: the fastft variants patch the shared model")
    if "liger" in args.variants and len(args.variants) > 1:
        parser.error("liger patches transformers' module globals: search it in its own process (--variants liger)")

    model = build_lora_model(model_config("llama8b"), "cuda", "nf4")
    model.train()
    results = {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(), "variants": {}}
    for variant in args.variants:
        if variant.startswith("fastft"):
            patch_model(model)
        set_mode(model, CHECKPOINTING[variant])
        if variant == "liger":
            _apply_liger(find_hf_model(model))
        results["variants"][variant] = search(model, args.low, args.high, args.granularity, args.budget_s)
        args.out.write_text(json.dumps(results, indent=1))
    lines = [f"`{results['command']}` on {results['gpu']}", "",
             "| variant | longest seq that trains (bs 1) | shortest failing | search complete |", "|---|---|---|---|"]  # fmt: skip
    for variant, found in results["variants"].items():
        lines.append(f"| {variant} | {found['longest_fitting']} | {found['shortest_failing']} | {found['complete']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
