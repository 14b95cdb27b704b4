"""benchmarks/kernels_lora.py's comparisons on CPU at small shapes: each fused op is the PEFT module it is timed against."""

from itertools import islice
from pathlib import Path

import torch
from helpers import load_script

bench = load_script(Path(__file__).parents[1] / "benchmarks" / "kernels_lora.py")


def test_fused_cases_compute_what_peft_computes():
    torch.manual_seed(0)
    cases = list(islice(bench.cases("cpu", tokens=9, hidden=32, intermediate=48, q_out=32, kv_out=16), 4))  # bf16
    assert [(kernel, impl) for kernel, _, _, impl, _, _ in cases] == [
        ("lora_mlp", "fastft"), ("lora_mlp", "peft"), ("lora_qkv", "fastft"), ("lora_qkv", "peft")
    ]  # fmt: skip
    for (_, _, _, _, fused, leaves), (_, _, _, _, reference, _) in (cases[0:2], cases[2:4]):
        outputs = []
        for forward in (fused, reference):
            out = forward()
            out = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(out, [torch.ones_like(o) for o in out])
            outputs.append(([o.detach().float() for o in out], [leaf.grad.float() for leaf in leaves]))
            for leaf in leaves:
                leaf.grad = None
        (fused_out, fused_grads), (ref_out, ref_grads) = outputs
        for got, want in zip(fused_out + fused_grads, ref_out + ref_grads):
            assert (got - want).abs().max() <= 2e-2 * want.abs().max() + 1e-6
