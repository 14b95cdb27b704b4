"""GPU benchmark: peak memory and step time of activation checkpointing modes.

Model: ``train_bench``'s Llama-3-8B shape (hidden 4096, intermediate 14336, 32/8 heads, vocab
128256) truncated to a few layers, bf16 random weights, PEFT LoRA r16 on all linears. Modes: no
checkpointing, HF gradient checkpointing, our ``"recompute"`` and our ``"offload"``; one fwd+bwd
step at bs 1.

``run(results)`` fills ``results["activation_checkpointing"]``; ``set_mode`` is shared with
``benchmarks/max_context.py``.
``python benchmarks/offload.py`` prints the table and writes ``benchmarks/results/offload.json``.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import torch
from train_bench import build_lora_model, model_config

from lightning_fastft.training.checkpointing import (
    apply_activation_checkpointing,
    disable_hf_gradient_checkpointing,
    hf_gradient_checkpointing_on,
    remove_activation_checkpointing,
)

MODES = ("none", "hf", "recompute", "offload")
SEQ_LENS = (8192, 16384)


def set_mode(model: torch.nn.Module, mode: str) -> None:
    """Switch ``model`` (a PEFT/HF causal LM) to one checkpointing mode of :data:`MODES`."""
    remove_activation_checkpointing(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hf_gradient_checkpointing_on(base):
        disable_hf_gradient_checkpointing(base)
        base.disable_input_require_grads()  # HF's enable hooked the embeddings
    if mode == "hf":
        # transformers >= 5.20 renamed it (the old name warns); HF makes the embeddings' output require grad
        enable = getattr(base, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif mode in ("recompute", "offload"):
        apply_activation_checkpointing(model, mode)
    elif mode != "none":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


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
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            train_step(model, seq_len)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
        return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30, "step_s": seconds}
    except torch.cuda.OutOfMemoryError:
        return {"error": "OOM"}
    finally:
        _free_cuda_memory(model)


def run(results: dict, num_layers: int = 4, seq_lens: tuple[int, ...] = SEQ_LENS) -> dict:
    """Fill ``results["activation_checkpointing"]`` with one row per (seq_len, mode)."""
    model = build_lora_model(model_config("llama8b", layers=num_layers), "cuda", quant=None).train()
    rows = []
    for seq_len in seq_lens:
        for mode in MODES:
            set_mode(model, mode)
            row = {"seq_len": seq_len, "mode": mode, "layers": num_layers, **measure(model, seq_len)}
            rows.append(row)
            print(row, flush=True)
    results["activation_checkpointing"] = rows
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    collected = run({"device": torch.cuda.get_device_name()})
    print(f"{'seq':>6} {'mode':>10} {'peak GiB':>9} {'step s':>7}")
    for row in collected["activation_checkpointing"]:
        if "error" in row:
            print(f"{row['seq_len']:>6} {row['mode']:>10} {row['error']:>9}")
        else:
            print(f"{row['seq_len']:>6} {row['mode']:>10} {row['peak_gib']:>9.2f} {row['step_s']:>7.3f}")
    path = Path(__file__).parent / "results" / "offload.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(collected, indent=2))
