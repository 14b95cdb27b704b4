"""GPU micro-benchmark for issue 13, goal 1: is ``x [W; A]^T`` (LoRA's ``A`` rows appended to the frozen
weight) in one GEMM faster than today's separate GEMMs, at the Llama-3-8B LoRA shapes?

    . benchmarks/gpu_env.sh
    python benchmarks/lora_concat_gemm.py --out benchmarks/results/lora_concat_gemm_h200.json

Today (``lightning_fastft/kernels/lora.py``) each projection ``i`` of a group (Q/K/V of one input,
gate/up of one input, O, down) runs ``y_i = x W_i^T`` and ``xa_i = x A_i^T`` as two GEMMs, and its
input gradient ``dx += dy_i W_i + dxa_i A_i`` as two more. Concatenated:

* forward: ``[y_1 .. y_n, xa_1 .. xa_n] = x [W_1; ..; W_n; A_1; ..; A_n]^T``, one GEMM with N = sum of
  the outputs + n r; the ``A`` rows are copied (cast to the compute dtype) into a buffer that holds
  the frozen ``W`` for good, every step (timed with it);
* backward: ``dx = [dy_1 .. dy_n, dxa_1 .. dxa_n] [W_1; ..; W_n; A_1; ..; A_n]``, one GEMM with
  K = sum of the outputs + n r, after concatenating the incoming gradients (timed with it).

The ``s xa B^T`` update and the weight gradients are the same either way and not timed. Per group:
the medians (``triton.testing.do_bench``) of both ways, the speed-up, and the largest difference of
each way from an fp32 reference relative to its largest value (both must be at bf16 rounding).
CPU: ``--device cpu --tokens 64 --scale 64`` runs the same code on shapes divided by 64 (times
meaningless), as a check of the script.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

HIDDEN, INTERMEDIATE, Q, KV = 4096, 14336, 4096, 1024
GROUPS = {  # input features, output features of each projection
    "qkv": (HIDDEN, (Q, KV, KV)),
    "o": (Q, (HIDDEN,)),
    "gate_up": (HIDDEN, (INTERMEDIATE, INTERMEDIATE)),
    "down": (INTERMEDIATE, (HIDDEN,)),
}
COLUMNS = (
    "group", "tokens", "n_fused", "fwd_separate_ms", "fwd_concat_ms", "fwd_speedup", "bwd_separate_ms",
    "bwd_concat_ms", "bwd_speedup", "fwd_err_separate", "fwd_err_concat", "bwd_err_separate", "bwd_err_concat",
)  # fmt: skip


def median_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        return harness.launch_ms(fn)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return ((actual.float() - reference).abs().max() / reference.abs().max()).item()


def run_group(name: str, tokens: int, rank: int, scale: int, device: torch.device, dtype: torch.dtype) -> dict:
    features, outs = GROUPS[name]
    features, outs = features // scale, tuple(out // scale for out in outs)
    x = torch.randn(tokens, features, device=device, dtype=dtype)
    weights = [torch.randn(out, features, device=device, dtype=dtype) / features**0.5 for out in outs]
    adapters = [torch.randn(rank, features, device=device) / features**0.5 for _ in outs]  # PEFT's fp32 A
    dys = [torch.randn(tokens, out, device=device, dtype=dtype) for out in outs]
    dxas = [torch.randn(tokens, rank, device=device, dtype=dtype) for _ in outs]
    total = sum(outs)
    packed = torch.empty(total + rank * len(outs), features, device=device, dtype=dtype)
    torch.cat(weights, out=packed[:total])

    def forward_separate():
        return [F.linear(x, w) for w in weights] + [x @ a.to(dtype).t() for a in adapters]

    def forward_concat():
        for i, a in enumerate(adapters):
            packed[total + i * rank : total + (i + 1) * rank].copy_(a)
        return x @ packed.t()

    def backward_separate():
        dx = dys[0] @ weights[0]
        for dy, w in zip(dys[1:], weights[1:]):
            dx.addmm_(dy, w)
        for dxa, a in zip(dxas, adapters):
            dx.addmm_(dxa, a.to(dtype))
        return dx

    def backward_concat():
        return torch.cat([*dys, *dxas], dim=1) @ packed

    reference_fwd = torch.cat([x.float() @ w.float().t() for w in weights] + [x.float() @ a.to(dtype).float().t() for a in adapters], 1)
    reference_bwd = sum(dy.float() @ w.float() for dy, w in zip(dys, weights))
    reference_bwd = reference_bwd + sum(dxa.float() @ a.to(dtype).float() for dxa, a in zip(dxas, adapters))
    row = {"group": name, "tokens": tokens, "n_fused": packed.shape[0]}
    row["fwd_err_separate"] = relative_error(torch.cat(forward_separate(), 1), reference_fwd)
    row["fwd_err_concat"] = relative_error(forward_concat(), reference_fwd)
    row["bwd_err_separate"] = relative_error(backward_separate(), reference_bwd)
    row["bwd_err_concat"] = relative_error(backward_concat(), reference_bwd)
    row["fwd_separate_ms"] = median_ms(forward_separate, device)
    row["fwd_concat_ms"] = median_ms(forward_concat, device)
    row["bwd_separate_ms"] = median_ms(backward_separate, device)
    row["bwd_concat_ms"] = median_ms(backward_concat, device)
    row["fwd_speedup"] = row["fwd_separate_ms"] / row["fwd_concat_ms"]
    row["bwd_speedup"] = row["bwd_separate_ms"] / row["bwd_concat_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 2048], help="bs 4 and bs 1 at seq 2048")
    parser.add_argument("--rank", type=int, default=harness.LORA_R)
    parser.add_argument("--scale", type=int, default=1, help="divide every feature size (CPU check)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), torch.bfloat16
    torch.manual_seed(0)
    rows = []
    for tokens in args.tokens:
        for name in GROUPS:
            rows.append(run_group(name, tokens, args.rank, args.scale, device, dtype))
            row = rows[-1]
            print(f"{name} x{tokens}: fwd {row['fwd_separate_ms']:.3f} -> {row['fwd_concat_ms']:.3f} ms "
                  f"({row['fwd_speedup']:.3f}x), bwd {row['bwd_separate_ms']:.3f} -> {row['bwd_concat_ms']:.3f} ms "
                  f"({row['bwd_speedup']:.3f}x)", flush=True)  # fmt: skip
    notes = [
        "Per decoder layer one each of qkv, o, gate_up, down: the sums of the columns are the layer's "
        "forward / input-gradient GEMM time both ways (frozen-weight input gradients, recompute aside).",
        "err: max |result - fp32 reference| / max |reference| (bf16 rounding is ~4e-3).",
    ]
    harness.write_results(args.out, "LoRA: [W; A] in one GEMM vs separate GEMMs", harness.run_meta(), rows, COLUMNS, notes)


if __name__ == "__main__":
    main()
