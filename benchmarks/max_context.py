"""Longest sequence (batch 1) that trains one step of QLoRA on this GPU, per variant.

    python benchmarks/max_context.py --variants hf fastft_offload --out benchmarks/results/max_context_8b_qlora.json

One model is built (``--shape``: Llama-3-8B or -70B, random NF4 base, LoRA r16 on all linears) and reused:
``hf`` runs first (HF gradient checkpointing, HF loss), then the model is patched for the fastft
variants (``fastft``: our recompute checkpointing; ``fastft_offload``: layer inputs in pinned host
memory). ``liger`` (HF gradient checkpointing plus Liger-Kernel's patches, which change
transformers' module globals) must be searched alone, in its own process. Each variant bisects
(``harness.search_longest`` with ``low``) over multiples of ``--granularity`` in [low, high]; a
probe is one forward+backward; out-of-memory (device, or pinned host memory for offload) means "does not fit". A per-variant time budget stops
the search early, reporting the bracket found so far (``complete`` false). Writes ``<out>`` and
``.md`` (``harness.write_results``). ``--memory-gib`` caps the process's device memory
(``torch.cuda.set_per_process_memory_fraction``), e.g. to measure an 80 GB card's limit on a larger one. ``train_bench.py --max-context`` runs the same search with
whole ``Trainer.fit`` probes, each in a fresh process.
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

from lightning_fastft._hf import find_hf_model  # noqa: E402
from lightning_fastft.training.memory_plan import GIB  # noqa: E402
from lightning_fastft.patching import patch_model  # noqa: E402

CHECKPOINTING = {"hf": "hf", "liger": "hf", "fastft": "recompute", "fastft_offload": "offload"}
COLUMNS = ("variant", "max_seq_len_fits", "first_failing_seq_len", "complete")


def fits(model: torch.nn.Module, seq_len: int) -> bool:
    input_ids = torch.randint(0, model.config.vocab_size, (1, seq_len), device="cuda")
    try:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        torch.cuda.synchronize()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    except (MemoryError, RuntimeError) as error:  # host memory for the offloaded layer inputs ran out
        if isinstance(error, RuntimeError) and "out of memory" not in str(error):
            raise
        print(f"host memory: {error}", flush=True)
        return False
    finally:
        del input_ids
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()


def search(model, low: int, high: int, granularity: int, budget_s: float) -> dict:
    """Bisection over the multiples of ``granularity`` in [low, high] within ``budget_s`` seconds."""

    def probe(seq_len: int) -> dict:
        with harness.PeakMemory("cuda") as memory, harness.Stopwatch(device=None) as stopwatch:
            ok = fits(model, seq_len)
        record = {"status": "ok" if ok else "oom", "fits": ok, "seconds": stopwatch.seconds, "peak_gib": memory.peak_gib}
        print({"seq_len": seq_len, **record}, flush=True)
        return record

    found = harness.search_longest(
        probe, low=low, high=high, granularity=granularity, deadline=time.monotonic() + budget_s
    )
    del found["error"]  # a probe either fits or runs out of memory
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=("llama8b", "llama70b"), default="llama8b")
    parser.add_argument("--memory-gib", type=float, help="cap on this process's device memory")
    parser.add_argument("--variants", nargs="+", default=["hf", "fastft_offload"], choices=list(CHECKPOINTING))
    parser.add_argument("--low", type=int, default=8192)
    parser.add_argument("--high", type=int, default=196608)
    parser.add_argument("--granularity", type=int, default=4096)
    parser.add_argument("--budget-s", type=float, default=240.0, help="per variant")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if "hf" in args.variants and args.variants[0] != "hf":
        parser.error("hf must come first: the fastft variants patch the shared model")
    if "liger" in args.variants and len(args.variants) > 1:
        parser.error("liger patches transformers' module globals: search it in its own process (--variants liger)")

    if args.memory_gib is not None:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * GIB / total))
    model = harness.build_lora_model(harness.model_config(args.shape), "cuda", "nf4")
    model.train()
    meta = harness.run_meta(shape=args.shape, quant="nf4", memory_gib=args.memory_gib)
    rows: list[dict] = []
    for variant in args.variants:
        if variant.startswith("fastft"):
            patch_model(model)
        harness.set_checkpointing(model, CHECKPOINTING[variant])
        if variant == "liger":
            harness.apply_liger(find_hf_model(model))
        rows.append({"variant": variant, **search(model, args.low, args.high, args.granularity, args.budget_s)})
        harness.write_results(args.out, "Longest trainable context, 8B QLoRA (bs 1, one step)", meta, rows, COLUMNS)
    print(harness.markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
