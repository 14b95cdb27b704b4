"""GPU micro-benchmark: RMSNorm and RoPE, fastft vs PyTorch eager vs Liger-Kernel.

``run(results)`` appends one dict per (kernel, shape, impl) with the keys of
:func:`harness.kernel_times` (GPU times from CUDA-graph replays, launch-bound times from
``do_bench``, peak memory); GB/s counts each input read once and each output written once.
CUDA only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

HIDDEN = 4096
SEQ_LENS = (2048, 8192)
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPE = torch.bfloat16


def _liger(name: str):
    try:
        from liger_kernel.ops import rms_norm, rope
    except ImportError:
        return None
    return {"rms_norm": rms_norm.LigerRMSNormFunction, "rope": rope.LigerRopeFunction}[name]


def rms_norm_cases(seq_len: int):
    from lightning_fastft.kernels.rms_norm import rms_norm, rms_norm_reference

    eps = 1e-6
    impls = {
        "fastft": lambda x, w: rms_norm(x, w, eps),
        "eager": lambda x, w: rms_norm_reference(x, w, eps),
    }
    liger = _liger("rms_norm")
    if liger is not None:
        impls["liger"] = lambda x, w: liger.apply(x, w, eps)

    def make_inputs():
        x = torch.randn(1, seq_len, HIDDEN, device="cuda", dtype=DTYPE, requires_grad=True)
        w = (1 + 0.1 * torch.randn(HIDDEN, device="cuda")).to(DTYPE).requires_grad_()
        return x, w

    element = torch.finfo(DTYPE).bits // 8
    activation = seq_len * HIDDEN * element
    bytes_fwd = 2 * activation + HIDDEN * element  # read x, w; write y
    bytes_bwd = 3 * activation + 2 * HIDDEN * element  # read dy, x, w; write dx, dw
    for impl, forward in impls.items():
        yield impl, (1, seq_len, HIDDEN), make_inputs, forward, lambda y: torch.randn_like(y), bytes_fwd, bytes_bwd, 0.0


def rope_cases(seq_len: int):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from lightning_fastft.kernels.rope import rope_qk_

    inv_freq = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM)
    freqs = torch.arange(seq_len, device="cuda").float()[:, None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)[None]
    cos, sin = angles.cos().to(DTYPE), angles.sin().to(DTYPE)

    def make_projections():  # (B, S, H*D) as a projection returns them
        q = torch.randn(1, seq_len, Q_HEADS * HEAD_DIM, device="cuda", dtype=DTYPE, requires_grad=True)
        k = torch.randn(1, seq_len, KV_HEADS * HEAD_DIM, device="cuda", dtype=DTYPE, requires_grad=True)
        return q, k

    def heads_first(q, k):  # the (B, H, S, D) layout HF and Liger take
        return (
            q.view(1, seq_len, Q_HEADS, HEAD_DIM).transpose(1, 2),
            k.view(1, seq_len, KV_HEADS, HEAD_DIM).transpose(1, 2),
        )

    def fastft(q, k):
        if torch.is_grad_enabled():  # leaves can't be rotated in place: rotate non-leaf copies, as a model
            q, k = q.clone(), k.clone()  # rotates its projection outputs (the clone's backward is free)
        return rope_qk_(q.view(1, seq_len, Q_HEADS, HEAD_DIM), k.view(1, seq_len, KV_HEADS, HEAD_DIM), cos, sin)

    impls = {"fastft": fastft, "eager": lambda q, k: apply_rotary_pos_emb(*heads_first(q, k), cos, sin)}
    liger = _liger("rope")
    if liger is not None:
        impls["liger"] = lambda q, k: liger.apply(*heads_first(q, k), cos, sin)

    element = torch.finfo(DTYPE).bits // 8
    qk_bytes = seq_len * (Q_HEADS + KV_HEADS) * HEAD_DIM * element
    angle_bytes = 2 * seq_len * HEAD_DIM * element
    bytes_moved = 2 * qk_bytes + angle_bytes  # read q, k, cos, sin; write q, k (same for the backward)
    shape = (1, seq_len, Q_HEADS, KV_HEADS, HEAD_DIM)
    clone_sets = [make_projections() for _ in range(4)]
    clone_ms = harness.graph_ms(lambda i: [t.clone() for t in clone_sets[i]], len(clone_sets))
    del clone_sets
    for impl, forward in impls.items():
        grads_for = lambda outputs: [torch.randn_like(t) for t in outputs]  # noqa: E731
        fb_overhead_ms = clone_ms if impl == "fastft" else 0.0
        yield impl, shape, make_projections, forward, grads_for, bytes_moved, bytes_moved, fb_overhead_ms


def run(results: list) -> None:
    """Append one result dict per (kernel, shape, impl); needs CUDA."""
    if not torch.cuda.is_available():
        raise RuntimeError("benchmarks.kernels_norm_rope.run needs a CUDA device")
    for kernel, cases in (("rms_norm", rms_norm_cases), ("rope", rope_cases)):
        for seq_len in SEQ_LENS:
            for impl, shape, make_inputs, forward, grads_for, bytes_fwd, bytes_bwd, fb_overhead_ms in cases(seq_len):
                measured = harness.kernel_times(make_inputs, forward, grads_for, bytes_fwd, bytes_bwd, fb_overhead_ms)
                results.append({"kernel": kernel, "shape": shape, "dtype": str(DTYPE), "impl": impl, **measured})


if __name__ == "__main__":
    rows: list = []
    run(rows)
    print(harness.markdown_table(rows, harness.KERNEL_COLUMNS, integers_from=100))
