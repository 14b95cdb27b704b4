"""GPU micro-benchmark: fused LoRA MLP / QKV vs PEFT modules, and NF4 dequantisation vs bitsandbytes.

``run(results)`` appends one dict per (kernel, shape, dtype, impl):
``{kernel, shape, dtype, impl, fwd_ms, bwd_ms, peak_mib}`` (plus ``gbps`` for the dequant).

* Llama-3-8B shapes: hidden 4096, intermediate 14336, 32 query / 8 KV heads of 128, LoRA r=16
  (alpha 32, dropout 0) on every projection, one sequence of 2048 tokens; base weights bf16 or
  NF4 with double quant (bitsandbytes ``Linear4bit``), activations bf16, adapters as PEFT makes
  them by default (fp32: PEFT computes the LoRA path in fp32, the fused ops cast it to bf16).
* Times are ``triton.testing.do_bench`` medians (:func:`harness.launched_time_and_memory`, :func:`harness.launch_ms`). ``fwd_ms`` is the forward with autograd
  recording; ``bwd_ms`` is (forward + backward) minus forward (the fused MLP allows one backward
  per forward, so the backward is not timed alone).
* ``peak_mib``: peak CUDA memory of one forward + backward above what was allocated before it.
* Dequant ``gbps``: packed bytes read plus dense bytes written, over the time.

Run ``python benchmarks/kernels_lora.py`` for a table (CUDA only).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

TOKENS = 2048
HIDDEN, INTERMEDIATE = 4096, 14336
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
RANK = 16
DTYPE = torch.bfloat16


class _Projections(nn.Module):
    """Bare projections named like HF's, to wrap with PEFT (no 8B model needed)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], nf4: bool, device: str):
        super().__init__()
        for name, (n_in, n_out) in shapes.items():
            if nf4:
                import bitsandbytes as bnb

                layer = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=DTYPE, quant_type="nf4",
                                          compress_statistics=True, quant_storage=torch.uint8)
                layer.weight = bnb.nn.Params4bit(torch.randn(n_out, n_in, dtype=DTYPE) * 0.02, requires_grad=False,
                                                 quant_type="nf4", compress_statistics=True)
            else:
                layer = nn.Linear(n_in, n_out, bias=False, dtype=DTYPE)
                nn.init.normal_(layer.weight, std=0.02)
            setattr(self, name, layer)
        self.to(device)


def _peft(shapes, nf4: bool, device: str) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=list(shapes),
                        init_lora_weights=False)
    return get_peft_model(_Projections(shapes, nf4, device), config).base_model.model


def cases(device: str = "cuda", tokens: int = TOKENS, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE,
          q_out: int = Q_HEADS * HEAD_DIM, kv_out: int = KV_HEADS * HEAD_DIM):
    """``(kernel, shape, dtype, impl, forward, leaves)`` for each comparison; ``forward()``
    returns a tensor or a tuple to backpropagate, ``leaves`` get ``.grad``."""
    import torch.nn.functional as F

    from lightning_fastft.patching.lora import GLU_MLP, QKV, fused_mlp, fused_qkv, projection_plans

    for nf4 in (False, True):
        dtype_name = "nf4" if nf4 else "bf16"
        x = torch.randn(1, tokens, hidden, device=device, dtype=DTYPE, requires_grad=True)

        mlp = _peft(dict(gate_proj=(hidden, intermediate), up_proj=(hidden, intermediate),
                         down_proj=(intermediate, hidden)), nf4, device)
        leaves = [x] + [p for p in mlp.parameters() if p.requires_grad]
        mlp_plans = projection_plans(mlp, GLU_MLP)
        assert mlp_plans is not None
        shape = f"{tokens}x{hidden}x{intermediate}"
        yield "lora_mlp", shape, dtype_name, "fastft", lambda x=x, p=mlp_plans: fused_mlp(p, x, "silu"), leaves
        yield "lora_mlp", shape, dtype_name, "peft", (
            lambda x=x, m=mlp: m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))), leaves
        del mlp, mlp_plans

        attn = _peft(dict(q_proj=(hidden, q_out), k_proj=(hidden, kv_out), v_proj=(hidden, kv_out)), nf4, device)
        leaves = [x] + [p for p in attn.parameters() if p.requires_grad]
        qkv_plans = projection_plans(attn, QKV)
        assert qkv_plans is not None
        shape = f"{tokens}x{hidden}->{q_out}+2x{kv_out}"
        yield "lora_qkv", shape, dtype_name, "fastft", lambda x=x, p=qkv_plans: fused_qkv(p, x), leaves
        yield "lora_qkv", shape, dtype_name, "peft", (
            lambda x=x, m=attn: (m.q_proj(x), m.k_proj(x), m.v_proj(x))), leaves


def _bench_dequant(results: list) -> None:
    import bitsandbytes.functional as bnb_functional

    from lightning_fastft.kernels.nf4 import dequantize_4bit

    for n_out, n_in in ((INTERMEDIATE, HIDDEN), (HIDDEN, HIDDEN)):
        weight = torch.randn(n_out, n_in, device="cuda", dtype=DTYPE)
        packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
        moved = packed.numel() + weight.numel() * weight.element_size()
        for impl, fn in (("fastft", lambda: dequantize_4bit(packed, state)),
                         ("bitsandbytes", lambda: bnb_functional.dequantize_4bit(packed, state))):
            ms = harness.launch_ms(fn)
            results.append(dict(kernel="dequantize_nf4", shape=f"{n_out}x{n_in}", dtype="bf16", impl=impl,
                                fwd_ms=ms, bwd_ms=None, peak_mib=None, gbps=moved / ms / 1e6))


def run(results: list) -> None:
    """Append the LoRA and NF4 dequant benchmark rows to ``results`` (CUDA only)."""
    for kernel, shape, dtype, impl, forward, leaves in cases():
        fwd_ms, bwd_ms, peak_mib = harness.launched_time_and_memory(forward, leaves)
        results.append(dict(kernel=kernel, shape=shape, dtype=dtype, impl=impl,
                            fwd_ms=fwd_ms, bwd_ms=bwd_ms, peak_mib=peak_mib))
    _bench_dequant(results)


if __name__ == "__main__":
    rows: list = []
    run(rows)
    print(harness.markdown_table(rows, (*harness.KERNEL_COLUMNS, "gbps"), integers_from=100))
