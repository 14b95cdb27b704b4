"""Can a Triton GEMM carry LoRA's rank-r term inside its K loop faster than cuBLAS's two products?

LoRA's rank-r term of a projection, ``s (x A^T) B^T``, is one more K block of the frozen product: with
``xa = s x A^T`` (M, r) beside ``x`` and ``B`` (N, r) beside ``W``, ``y = [x | xa] [W | B]^T``. cuBLAS
can only take that as one GEMM over copied, concatenated operands (``lora_concat_gemm.py``'s ``kcat``
rows); a kernel of our own reads the extra block from where it lies, one more ``tl.dot`` per output
tile (r / K = 0.4 % more work at K = 4096). It pays only if the kernel's frozen product itself is about
as fast as cuBLAS's. This script times, for the Llama-3-8B projection groups at 8192 tokens:

* ``cublas``: ``x W^T`` alone (the frozen product, no LoRA: the floor);
* ``cublas_prefill``: what ``kernels/lora.py`` runs, ``y = xa B^T`` (``beta = 0``) then ``y += x W^T``;
* ``triton``: a persistent TMA Triton GEMM, the frozen product alone;
* ``triton_lora``: the same kernel with the rank-r block in its K loop.

The same for the input gradient (``dx = dy W`` + ``dxa A``; the reduction runs over the projection's
outputs). Each Triton row is the fastest of a few tile configurations (listed in the JSON). ``err`` is
the largest difference to an fp32 product, relative to its largest value.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

GROUPS = {  # name: (outputs N, inputs K) of the Llama-3-8B projection group, as kernels/lora.py runs them
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
}

CONFIGS = [  # BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_stages, num_warps, warp_specialize
    (128, 256, 64, 8, 3, 8, False),
    (128, 256, 64, 8, 4, 8, False),
    (128, 128, 64, 8, 4, 8, False),
    (128, 128, 64, 8, 5, 4, False),
    (128, 256, 64, 8, 3, 8, True),
    (128, 128, 64, 8, 4, 8, True),
]


@triton.jit
def _tile_of(tile, num_m, num_n, GROUP_M: tl.constexpr):
    per_group = GROUP_M * num_n
    group = tile // per_group
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % size_m, (tile % per_group) // size_m


@triton.jit
def _lora_gemm_kernel(
    a_desc, b_desc, a2_desc, b2_desc, c_desc, M, N, K,
    B_KMAJOR: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):  # fmt: skip
    """``c = a b + a2 b2`` over (BLOCK_M, BLOCK_N) tiles, persistent. ``b`` is stored (N, K) (K-major,
    the forward's ``W``) when ``B_KMAJOR``, else (K, N) (the input gradient's ``W``); ``b2`` likewise."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_of(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([off_m, ki * BLOCK_K])
            if B_KMAJOR:
                b = b_desc.load([off_n, ki * BLOCK_K]).T
            else:
                b = b_desc.load([ki * BLOCK_K, off_n])
            acc = tl.dot(a, b, acc)
        if HAS_LORA:
            a2 = a2_desc.load([off_m, 0])
            if B_KMAJOR:
                b2 = b2_desc.load([off_n, 0]).T
            else:
                b2 = b2_desc.load([0, off_n])
            acc = tl.dot(a2, b2, acc)
        c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


def triton_lora_gemm(a, b, a2, b2, config, b_kmajor: bool):
    from triton.tools.tensor_descriptor import TensorDescriptor

    block_m, block_n, block_k, group_m, stages, warps, ws = config
    M, K = a.shape
    N = b.shape[0] if b_kmajor else b.shape[1]
    c = torch.empty(M, N, dtype=a.dtype, device=a.device)
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 4
    b_block = [block_n, block_k] if b_kmajor else [block_k, block_n]
    a_desc = TensorDescriptor.from_tensor(a, [block_m, block_k])
    b_desc = TensorDescriptor.from_tensor(b, b_block)
    has_lora = a2 is not None
    if has_lora:
        r = a2.shape[1]
        a2_desc = TensorDescriptor.from_tensor(a2, [block_m, r])
        b2_desc = TensorDescriptor.from_tensor(b2, [block_n, r] if b_kmajor else [r, block_n])
    else:
        a2_desc = b2_desc = a_desc
    c_desc = TensorDescriptor.from_tensor(c, [block_m, block_n])
    grid = (min(sms, triton.cdiv(M, block_m) * triton.cdiv(N, block_n)),)
    _lora_gemm_kernel[grid](
        a_desc, b_desc, a2_desc, b2_desc, c_desc, M, N, K, B_KMAJOR=b_kmajor, HAS_LORA=has_lora,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, NUM_SMS=sms, WARP_SPECIALIZE=ws,
        num_stages=stages, num_warps=warps,
    )  # fmt: skip
    return c


def measure(tokens: int, rank: int, scale: int, device: torch.device, configs, dtype=torch.bfloat16) -> list[dict]:
    rows = []
    s = 2.0
    for name, (n, k) in GROUPS.items():
        n, k = n // scale, k // scale
        gen = torch.Generator(device="cpu").manual_seed(0)

        def rand(*shape, std=1.0):
            return (torch.randn(*shape, generator=gen) * std).to(device, dtype)

        x, w = rand(tokens, k), rand(n, k, std=k**-0.5)
        lora_a, lora_b = rand(rank, k, std=k**-0.5), rand(n, rank, std=0.1)
        dy = rand(tokens, n)
        xa = torch.addmm(torch.zeros((), device=device, dtype=x.dtype), x, lora_a.T, beta=0, alpha=s)
        dxa = torch.addmm(torch.zeros((), device=device, dtype=x.dtype), dy, lora_b, beta=0, alpha=s)
        for pass_name, (a, b, a2, b2, kmajor) in {
            "forward": (x, w, xa, lora_b, True),  # y = x W^T + xa B^T
            "input_grad": (dy, w, dxa, lora_a, False),  # dx = dy W + dxa A
        }.items():
            out_n = b.shape[0] if kmajor else b.shape[1]
            base_ref = a.float() @ (b.float().T if kmajor else b.float())
            lora_ref = base_ref + a2.float() @ (b2.float().T if kmajor else b2.float())
            bm = b.T if kmajor else b
            b2m = b2.T if kmajor else b2

            def cublas_prefill():
                y = torch.mm(a2, b2m)
                return y.addmm_(a, bm)

            flops = 2 * tokens * out_n * a.shape[1]
            schemes = {"cublas": (lambda: torch.mm(a, bm), base_ref), "cublas_prefill": (cublas_prefill, lora_ref)}
            for label, lora in (("triton", False), ("triton_lora", True)):
                best = None
                for config in configs:
                    fn = partial(triton_lora_gemm, a, b, a2 if lora else None, b2, config, kmajor)
                    try:
                        ms = harness.median_ms(fn, device)
                    except Exception as error:  # a configuration this GPU or Triton cannot compile
                        print(f"{name} {pass_name} {label} {config}: {type(error).__name__}: {error}"[:300], flush=True)
                        continue
                    if best is None or ms < best[0]:
                        best = (ms, config, fn)
                if best is not None:
                    schemes[label] = (best[2], lora_ref if lora else base_ref, best[1])
            for scheme, (fn, ref, *config) in schemes.items():
                ms, err = harness.median_ms(fn, device), harness.relative_error(fn(), ref)
                rows.append({
                    "group": name, "tokens": tokens, "pass": pass_name, "scheme": scheme, "ms": ms,
                    "tflops": flops / ms / 1e9, "err": err, "config": str(config[0]) if config else "",
                })  # fmt: skip
                print(rows[-1], flush=True)
    return rows


COLUMNS = ["group", "tokens", "pass", "scheme", "ms", "tflops", "err", "config"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=harness.LORA_R)
    parser.add_argument("--scale", type=int, default=1, help="divide every feature size (CPU check)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small-tiles", action="store_true", help="64 x 64 x 32 tiles only (CPU check)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"),
                        help="float16 for the CPU check: the Triton interpreter misreads bf16 tensor descriptors")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    configs = [(64, 64, 32, 4, 2, 4, False)] if args.small_tiles else CONFIGS
    rows = measure(args.tokens, args.rank, args.scale, torch.device(args.device), configs, getattr(torch, args.dtype))
    notes = ["tflops: the frozen product's FLOPs (2 M N K) over the time, the rank-r block not counted. "
             "err: max |result - fp32 reference| / max |reference|; bf16 rounding is ~4e-3."]
    harness.write_results(args.out, __doc__.split("\n")[0], harness.run_meta(), rows, COLUMNS, notes)


if __name__ == "__main__":
    main()
