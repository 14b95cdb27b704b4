"""Sequence packing benchmark: token utilisation (CPU) and training throughput (CUDA).

Samples have long-tailed lengths (log-normal, median ~180 tokens, clipped to 16..2048), like an
instruction-tuning set. ``utilisation_report()`` (runs anywhere) compares the non-padding share of
per-batch padding with first-fit-decreasing packing. ``run(results)`` (CUDA) times whole epochs of
training steps over the same samples on a small bf16 Llama (hidden 1024, 8 layers) and fills
``results["packing"]`` with real (non-padding) tokens/s for: padded batches + SDPA, packed rows +
HF's SDPA (dense block mask from position_ids) and packed rows + ``fastft_varlen``.
``python benchmarks/packing.py [--out benchmarks/results/packing.json]`` prints both and writes
``<out>.json`` and ``.md`` (``harness.write_results``; the utilisation report and the varlen
backend in ``meta``).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from lightning_fastft.data import PackedCollator, PaddedCollator, pack_sequences, token_utilisation
from lightning_fastft.attention import pick_backend, use_varlen_attention

MAX_SEQ_LEN = 2048
COLUMNS = ("mode", "steps", "utilisation", "real_tokens_per_s", "epoch_s", "peak_gib")


def synthetic_samples(num_samples: int, *, vocab_size: int = 32000, seed: int = 0) -> list[dict]:
    """Random-token samples with log-normal lengths in 16..MAX_SEQ_LEN; the first third of each is prompt."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.empty(num_samples).log_normal_(mean=5.2, std=1.0, generator=generator)
    lengths = lengths.clamp(16, MAX_SEQ_LEN).long().tolist()
    samples = []
    for length in lengths:
        input_ids = torch.randint(3, vocab_size, (length,), generator=generator).tolist()
        prompt = length // 3
        samples.append({"input_ids": input_ids, "loss_mask": [0] * prompt + [1] * (length - prompt)})
    return samples


def padded_batches(samples: list[dict], batch_size: int) -> list[dict]:
    collate = PaddedCollator(MAX_SEQ_LEN)
    return [collate(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]


def packed_batches(samples: list[dict], rows_per_batch: int) -> list[dict]:
    rows = pack_sequences(samples, MAX_SEQ_LEN)
    collate = PackedCollator()
    return [collate(rows[i : i + rows_per_batch]) for i in range(0, len(rows), rows_per_batch)]


def utilisation_report(num_samples: int = 4000, batch_size: int = 8, seed: int = 0) -> dict:
    """Non-padding token share of per-batch padding vs packing, over the same synthetic samples."""
    samples = synthetic_samples(num_samples, seed=seed)
    padded, packed = padded_batches(samples, batch_size), packed_batches(samples, batch_size)
    return {
        "num_samples": num_samples,
        "real_tokens": sum(len(s["input_ids"]) for s in samples),
        "padded": {"batches": len(padded), "utilisation": token_utilisation(padded)},
        "packed": {"batches": len(packed), "utilisation": token_utilisation(packed)},
    }


def small_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=MAX_SEQ_LEN,
        use_cache=False,
    )
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        return LlamaForCausalLM(config).to(torch.bfloat16).train()


def measure_epoch(model: torch.nn.Module, batches: list[dict], warmup_steps: int = 2) -> dict:
    """Train one epoch over ``batches`` after a few warm-up steps; real tokens/s and peak memory."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    on_device = [
        {k: v.to("cuda", non_blocking=True) for k, v in b.items() if isinstance(v, torch.Tensor)}
        | {k: v for k, v in b.items() if not isinstance(v, torch.Tensor) and k != "num_real_tokens"}
        for b in batches
    ]

    def step(batch):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in on_device[:warmup_steps]:
        step(batch)
    with harness.PeakMemory("cuda") as memory, harness.Stopwatch("cuda") as stopwatch:
        for batch in on_device:
            step(batch)
    seconds = stopwatch.seconds
    utilisation = token_utilisation(batches)
    real_tokens = utilisation * sum(b["input_ids"].numel() for b in batches)
    del optimizer
    return {
        "steps": len(batches),
        "epoch_s": seconds,
        "real_tokens_per_s": real_tokens / seconds,
        "utilisation": utilisation,
        "peak_gib": memory.peak_gib,
    }


def run(results: dict, num_samples: int = 384, batch_size: int = 8) -> dict:
    """Fill ``results["packing"]`` with one row per mode (same samples, same model shape)."""
    samples = synthetic_samples(num_samples)
    padded, packed = padded_batches(samples, batch_size), packed_batches(samples, batch_size)
    model = small_llama()
    rows = []
    for mode, batches in (("padded_sdpa", padded), ("packed_sdpa", packed), ("packed_fastft_varlen", packed)):
        if mode == "packed_fastft_varlen":
            use_varlen_attention(model)
        row = {"mode": mode, **measure_epoch(model, batches)}
        rows.append(row)
        print(row, flush=True)
    probe = torch.empty(1, 16, 1, 64, device="cuda", dtype=torch.bfloat16)
    backend = pick_backend(probe, softcap=None, dropout=0.0, sliding_window=None)
    results["packing"] = {"varlen_backend": backend, "rows": rows}
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=harness.RESULTS_DIR / "packing.json")
    args = parser.parse_args(argv)
    report = {"utilisation": utilisation_report()}
    print(json.dumps(report, indent=1))
    rows: list[dict] = []
    if torch.cuda.is_available():
        run(report)
        rows = report["packing"]["rows"]
        report["varlen_backend"] = report.pop("packing")["varlen_backend"]
        print(harness.markdown_table(rows, COLUMNS))
    harness.write_results(args.out, "Sequence packing", harness.run_meta(**report), rows, COLUMNS)


if __name__ == "__main__":
    main()
