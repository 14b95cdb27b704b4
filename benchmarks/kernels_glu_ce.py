"""GPU micro-benchmarks: SwiGLU/GeGLU and fused linear cross-entropy vs eager PyTorch and Liger.

``run(results)`` appends one dict per (kernel, shape, dtype, impl):
``{kernel, shape, dtype, impl, fwd_ms, bwd_ms, fwd_gbps, bwd_gbps, peak_mib}``.

* GLU: :func:`harness.kernel_times` (GPU times from CUDA-graph replays over rotating inputs,
  launch-bound ``do_bench`` times beside them); ``fwd_gbps``/``bwd_gbps``: nominal bytes over
  the GPU time; forward reads gate and up and writes h, backward reads dh, gate and up and
  writes dgate and dup.
* Cross-entropy: :func:`harness.launched_time_and_memory` (medians of ``triton.testing.do_bench``). ``fwd_ms`` is the forward with
  autograd recording; ``bwd_ms`` is (forward + backward) minus forward, since the fused
  cross-entropy computes its gradients inside the forward and allows one backward per forward.
* ``peak_mib``: peak CUDA memory of one forward + backward above what was allocated before it
  (the inputs), i.e. activations, logits, workspaces and the gradients produced.

Liger kernels are imported lazily and skipped when ``liger_kernel`` is not installed.
Run ``python benchmarks/kernels_glu_ce.py`` for a table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

GLU_TOKENS = (2048, 8192)
GLU_INTERMEDIATE = 14336
CE_TOKENS = (2048, 8192)
CE_HIDDEN = 4096
CE_VOCAB = 128256


def _liger(module: str, name: str):
    try:
        return getattr(__import__(f"liger_kernel.ops.{module}", fromlist=[name]), name)
    except ImportError:
        return None


GLU_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


def glu_cases(tokens: int, activation: str = "silu"):
    """``(impl, shape, make_inputs, forward, grads_for, bytes_fwd, bytes_bwd, fb_overhead_ms)`` per
    implementation of the GLU of ``activation`` on ``tokens`` rows (the arguments of :func:`harness.kernel_times`)."""
    from lightning_fastft.kernels.glu import glu

    eager_act = {"silu": F.silu, "gelu_pytorch_tanh": lambda g: F.gelu(g, approximate="tanh")}[activation]
    liger_function = {
        "silu": lambda: _liger("swiglu", "LigerSiLUMulFunction"),
        "gelu_pytorch_tanh": lambda: _liger("geglu", "LigerGELUMulFunction"),
    }[activation]()
    dtype = torch.bfloat16
    shape = (tokens, GLU_INTERMEDIATE)

    def make_inputs():
        gate = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
        return gate, torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)

    impls = {
        "fastft": lambda gate, up: glu(gate, up, activation),
        "eager": lambda gate, up: eager_act(gate) * up,
    }
    if liger_function is not None:
        impls["liger"] = liger_function.apply
    element_bytes = tokens * GLU_INTERMEDIATE * dtype.itemsize
    for impl, forward in impls.items():
        yield impl, shape, make_inputs, forward, torch.randn_like, 3 * element_bytes, 5 * element_bytes, 0.0


def _bench_glu(results: list) -> None:
    for activation in GLU_ACTIVATIONS:
        for tokens in GLU_TOKENS:
            for impl, shape, make_inputs, forward, grads_for, bytes_fwd, bytes_bwd, overhead in glu_cases(tokens, activation):
                measured = harness.kernel_times(make_inputs, forward, grads_for, bytes_fwd, bytes_bwd, overhead)
                results.append({
                    "kernel": "swiglu" if activation == "silu" else "geglu_tanh",
                    "shape": shape,
                    "dtype": "bfloat16",
                    "impl": impl,
                    **measured,
                })


def _bench_cross_entropy(results: list) -> None:
    from lightning_fastft.kernels.cross_entropy import fused_linear_cross_entropy

    liger_function = _liger("fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction")

    def liger_loss(hidden, weight, target):
        out = liger_function.apply(hidden, weight, target)
        return out[0] if isinstance(out, tuple) else out

    dtype = torch.bfloat16
    for trainable_weight in (False, True):
        weight = (0.02 * torch.randn(CE_VOCAB, CE_HIDDEN, device="cuda")).to(dtype)
        weight.requires_grad_(trainable_weight)
        for tokens in CE_TOKENS:
            hidden = torch.randn(tokens, CE_HIDDEN, device="cuda", dtype=dtype, requires_grad=True)
            target = torch.randint(0, CE_VOCAB, (tokens,), device="cuda")
            target[: tokens // 4] = -100  # a prompt's worth of ignored tokens
            impls = {
                "fastft": lambda: fused_linear_cross_entropy(hidden, weight, target),
                "eager": lambda: F.cross_entropy((hidden @ weight.t()).float(), target),
            }
            if liger_function is not None:
                impls["liger"] = lambda: liger_loss(hidden, weight, target)
            leaves = [hidden, weight] if trainable_weight else [hidden]
            for impl, forward in impls.items():
                fwd_ms, bwd_ms, peak_mib = harness.launched_time_and_memory(forward, leaves)
                results.append({
                    "kernel": "linear_ce_" + ("trainable_w" if trainable_weight else "frozen_w"),
                    "shape": (tokens, CE_HIDDEN, CE_VOCAB),
                    "dtype": str(dtype).removeprefix("torch."),
                    "impl": impl,
                    "fwd_ms": fwd_ms,
                    "bwd_ms": bwd_ms,
                    "fwd_gbps": None,
                    "bwd_gbps": None,
                    "peak_mib": peak_mib,
                })
            del hidden, target
        del weight


def run(results: list) -> list:
    """Append the GLU and fused linear cross-entropy benchmark rows (CUDA only) and return them."""
    if not torch.cuda.is_available():
        return results
    _bench_glu(results)
    torch.cuda.empty_cache()
    _bench_cross_entropy(results)
    torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    rows = run([])
    if not rows:
        raise SystemExit("no CUDA device: nothing benchmarked")
    print(harness.markdown_table(rows, harness.KERNEL_COLUMNS, integers_from=100))
