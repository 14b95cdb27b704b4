"""GPU benchmark: peak memory and step time of activation checkpointing modes.

    . benchmarks/gpu_env.sh
    python benchmarks/offload.py [--layers 4] [--seq-lens 8192 16384] [--out benchmarks/results/offload.json]

Model: the Llama-3-8B shape (``harness.SHAPES["llama8b"]``: hidden 4096, intermediate 14336,
32/8 heads, vocab 128256) truncated to a few layers, bf16 random weights, PEFT LoRA r16 on all
linears. Modes (``harness.set_checkpointing``): no checkpointing, HF gradient checkpointing, our
``"recompute"`` and our ``"offload"``; one fwd+bwd step at bs 1. Per (seq_len, mode): peak
allocated memory and the mean step time over 3 steps after one warm-up step.
Writes ``<out>.json`` and ``.md`` (``harness.write_results``).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

MODES = harness.CHECKPOINTING_MODES
SEQ_LENS = (8192, 16384)
COLUMNS = ("seq_len", "mode", "layers", "peak_gib", "step_s", "error")


def train_step(model: torch.nn.Module, seq_len: int, batch_size: int = 1) -> None:
    input_ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), device="cuda")
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    model.zero_grad(set_to_none=True)


def _free_cuda_memory(model: torch.nn.Module) -> None:
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()


def measure(model: torch.nn.Module, seq_len: int, steps: int = 3) -> dict:
    """Peak allocated memory (GiB) and mean step time (s) over ``steps`` steps after one warm-up;
    ``{"error": "OOM"}`` when a step does not fit."""
    try:
        train_step(model, seq_len)
        with harness.PeakMemory("cuda") as memory, harness.Stopwatch("cuda") as stopwatch:
            for _ in range(steps):
                train_step(model, seq_len)
        return {"peak_gib": memory.peak_gib, "step_s": stopwatch.seconds / steps}
    except torch.cuda.OutOfMemoryError:
        return {"error": "OOM"}
    finally:
        _free_cuda_memory(model)


def run(num_layers: int = 4, seq_lens: tuple[int, ...] = SEQ_LENS) -> list[dict]:
    """One row per (seq_len, mode)."""
    model = harness.build_lora_model(harness.model_config("llama8b", layers=num_layers), "cuda", quant=None).train()
    rows = []
    for seq_len in seq_lens:
        for mode in MODES:
            harness.set_checkpointing(model, mode)
            row = {"seq_len": seq_len, "mode": mode, "layers": num_layers, **measure(model, seq_len)}
            rows.append(row)
            print(row, flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=list(SEQ_LENS))
    parser.add_argument("--out", type=Path, default=harness.RESULTS_DIR / "offload.json")
    args = parser.parse_args(argv)
    rows = run(args.layers, tuple(args.seq_lens))
    harness.write_results(args.out, "Activation checkpointing modes", harness.run_meta(), rows, COLUMNS)
    print(harness.markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
