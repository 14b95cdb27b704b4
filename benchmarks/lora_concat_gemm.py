"""GPU micro-benchmark for issue 13, goal 1: where should LoRA's rank-r terms ride, at the Llama-3-8B
LoRA shapes? Every scheme computes a whole projection group (Q/K/V of one input, O, gate/up of one
input, down) with its LoRA terms; they differ in the passes they make over the wide tensors.

    . benchmarks/gpu_env.sh
    python benchmarks/lora_concat_gemm.py --out benchmarks/results/lora_concat_gemm_h200.json

Forward, ``y_i = x W_i^T + s xa_i B_i^T`` with ``xa = x [A_1; ..; A_n]^T`` (one matmul in every scheme):

* ``update`` (``kernels/lora.py`` today): ``y_i = x W_i^T``, then ``y_i += s xa_i B_i^T`` in place
  (a rank-r GEMM reading and writing all of ``y_i``);
* ``prefill``: ``y_i = s xa_i B_i^T`` first, then the frozen GEMM accumulates onto it (``beta = 1``:
  ``y_i`` is read in the GEMM's epilogue, not in a pass of its own);
* ``kcat_copy``: one GEMM per projection over ``[x | xa]`` and ``[W_i | s B_i in its own columns]``
  (K grows by the group's ranks); ``x`` is copied into the wide input, ``s B_i`` into the wide weight
  (which would hold the frozen ``W_i`` for good);
* ``kcat``: as ``kcat_copy`` with ``x`` already in the wide input (its producer — RMSNorm, attention,
  the GLU — would write it there); only ``xa`` and ``s B_i`` are copied;
* ``kcat_fused``: as ``kcat`` with the group's projections as one GEMM (their wide weights stacked),
  the outputs column views of one result.
* ``merged``: ``prefill`` with the group's projections as one GEMM: ``[y_1 .. y_n] = s xa [B_1 ⊕ .. ⊕ B_n]^T``
  (one rank-R GEMM over the block-diagonal ``B``s), then ``+= x [W_1; ..; W_n]^T`` (the frozen weights
  stacked, as they would be held for good); the outputs column views of one result.

Input gradient, ``dx = sum_i (dy_i W_i + dxa_i A_i)`` with ``dxa_i = s dy_i B_i`` (returned too):

* ``update`` (today): ``dxa_i`` from rank-r GEMMs over ``dy_i``, ``dx = sum dy_i W_i``, then
  ``dx += [dxa_1 .. dxa_n] [A_1; ..; A_n]`` in place;
* ``prefill``: ``dx = [dxa ..] [A ..]`` first, the frozen GEMMs accumulate onto it;
* ``ncat``: ``[dx | dxa_1 .. dxa_n] = sum dy_i [W_i | s B_i in its own columns]`` — the forward's wide
  weight; ``dxa`` comes out of the frozen GEMMs (no rank-r GEMM over ``dy``), then ``dx += dxa A``;
* ``kcat_copy``: ``dx = [dy_1 .. dy_n | dxa_1 .. dxa_n] [W_1; ..; W_n; A_1; ..; A_n]``, one GEMM over
  the gradients copied side by side.
* ``merged``: the ``dy_i`` already side by side (the GLU backward could write gate/up's there; Q/K/V's come
  apart from attention and RoPE and would need gathering first, which is not timed):
  ``[dxa_1 .. dxa_n] = s [dy_1 .. dy_n] [B_1 ⊕ .. ⊕ B_n]``, ``dx = dxa [A ..]``, then
  ``dx += [dy_1 .. dy_n] [W_1; ..; W_n]``: one frozen GEMM over K = sum of out.

Weight gradients (``dA``, ``dB``) are the same in every scheme and not timed. Per group and scheme:
the median (``triton.testing.do_bench``, L2 flushed) and the largest difference from an fp32 reference
relative to its largest value (bf16 rounding is ~4e-3). ``layer_*`` rows sum a decoder layer (one of
each group) per scheme, with the forward counted twice (the recompute) — the number to weigh against
the step. CPU: ``--device cpu --tokens 64 --scale 64`` runs the same code on shapes divided by 64
(times meaningless), as a check of the script.
"""

from __future__ import annotations

import argparse
import sys
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
FORWARD = ("update", "prefill", "kcat_copy", "kcat", "kcat_fused", "merged")
BACKWARD = ("update", "prefill", "ncat", "kcat_copy", "merged")
COLUMNS = ("group", "tokens", "pass", "scheme", "ms", "vs_update", "err")
SCALING = 2.0  # PEFT's alpha / r at the benchmark's r 16, alpha 32


class Group:
    """One projection group's tensors in bf16 (the LoRA weights cast as the kernels cast them) and
    its wide layouts: ``wide_x`` (tokens, in + R) and per projection ``wide_w[i]`` (out_i, in + R),
    ``W_i`` in its first ``in`` columns, zeros but for ``s B_i`` in its own rank columns;
    ``stacked_w`` ((sum out) + R, in) = ``[W_1; ..; W_n; A_1; ..; A_n]``; ``merged_w`` (sum out, in) =
    ``[W_1; ..; W_n]``, ``block_B`` (sum out, R) = ``s (B_1 ⊕ .. ⊕ B_n)``, ``merged_dy`` the ``dy_i`` side by side."""

    def __init__(self, name: str, tokens: int, rank: int, scale: int, device: torch.device, dtype: torch.dtype):
        features, outs = GROUPS[name]
        self.features, self.outs = features // scale, tuple(out // scale for out in outs)
        k, ranks = self.features, rank * len(self.outs)
        randn = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
        self.x = randn(tokens, k)
        self.weights = [randn(out, k) / k**0.5 for out in self.outs]
        self.adapters = [randn(rank, k) / k**0.5 for _ in self.outs]
        self.lora_B = [randn(out, rank) / rank**0.5 for out in self.outs]
        self.dys = [randn(tokens, out) for out in self.outs]
        self.columns = [slice(k + i * rank, k + (i + 1) * rank) for i in range(len(self.outs))]
        self.wide_x = torch.empty(tokens, k + ranks, device=device, dtype=dtype)
        self.wide_x[:, :k].copy_(self.x)
        self.wide_w = [torch.zeros(out, k + ranks, device=device, dtype=dtype) for out in self.outs]
        for wide, weight in zip(self.wide_w, self.weights):
            wide[:, :k].copy_(weight)
        self.fused_w = torch.cat(self.wide_w)  # kcat_fused: views of it stand for the wide weights
        self.fused_views = list(self.fused_w.split(self.outs))
        self.stacked_w = torch.cat([*self.weights, *self.adapters])
        self.merged_w = torch.cat(self.weights)
        self.merged_dy = torch.cat(self.dys, dim=1)
        self.block_B = torch.block_diag(*self.lora_B).mul_(SCALING)

    def stacked_A(self) -> torch.Tensor:
        return torch.cat(self.adapters) if len(self.adapters) > 1 else self.adapters[0]

    def lora_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.stacked_A().t()

    def place_lora_B(self, wides: list[torch.Tensor]) -> None:
        for wide, lora_B, columns in zip(wides, self.lora_B, self.columns):
            wide[:, columns].copy_(lora_B)
            wide[:, columns].mul_(SCALING)

    def forward(self, scheme: str) -> list[torch.Tensor]:
        k = self.features
        if scheme in ("update", "prefill"):
            xa = self.lora_inputs(self.x).split([a.shape[0] for a in self.adapters], dim=1)
            outputs = []
            for weight, lora_B, part in zip(self.weights, self.lora_B, xa):
                if scheme == "update":
                    y = F.linear(self.x, weight)
                    y.addmm_(part, lora_B.t(), alpha=SCALING)
                else:
                    y = torch.addmm(self.x.new_zeros(()), part, lora_B.t(), beta=0, alpha=SCALING)
                    y.addmm_(self.x, weight.t())
                outputs.append(y)
            return outputs
        if scheme == "merged":
            y = torch.addmm(self.x.new_zeros(()), self.lora_inputs(self.x), self.block_B.t(), beta=0)
            return list(y.addmm_(self.x, self.merged_w.t()).split(self.outs, dim=1))
        if scheme == "kcat_copy":
            self.wide_x[:, :k].copy_(self.x)
        self.wide_x[:, k:].copy_(self.lora_inputs(self.wide_x[:, :k]))
        if scheme == "kcat_fused":
            self.place_lora_B(self.fused_views)
            return list((self.wide_x @ self.fused_w.t()).split(self.outs, dim=1))
        self.place_lora_B(self.wide_w)
        return [self.wide_x @ wide.t() for wide in self.wide_w]

    def lora_input_grads(self) -> list[torch.Tensor]:
        return [(dy @ lora_B).mul_(SCALING) for dy, lora_B in zip(self.dys, self.lora_B)]

    def backward(self, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dx, [dxa_1 .. dxa_n])``."""
        if scheme == "ncat":
            self.place_lora_B(self.wide_w)
            out = self.dys[0] @ self.wide_w[0]
            for dy, wide in zip(self.dys[1:], self.wide_w[1:]):
                out.addmm_(dy, wide)
            dx, dxa = out[:, : self.features], out[:, self.features :]
            dx.addmm_(dxa, self.stacked_A())
            return dx, dxa
        if scheme == "merged":
            dxa = self.merged_dy @ self.block_B
            return (dxa @ self.stacked_A()).addmm_(self.merged_dy, self.merged_w), dxa
        dxa = torch.cat(self.lora_input_grads(), dim=1)
        if scheme == "kcat_copy":
            return torch.cat([*self.dys, dxa], dim=1) @ self.stacked_w, dxa
        if scheme == "update":
            dx = self.dys[0] @ self.weights[0]
            for dy, weight in zip(self.dys[1:], self.weights[1:]):
                dx.addmm_(dy, weight)
            dx.addmm_(dxa, self.stacked_A())
        else:
            dx = dxa @ self.stacked_A()
            for dy, weight in zip(self.dys, self.weights):
                dx.addmm_(dy, weight)
        return dx, dxa

    def references(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 ``(all y side by side, dx, all dxa side by side)``."""
        f = lambda t: t.float()  # noqa: E731
        y = torch.cat([f(self.x) @ f(w).t() + SCALING * (f(self.x) @ f(a).t()) @ f(b).t()
                       for w, a, b in zip(self.weights, self.adapters, self.lora_B)], dim=1)  # fmt: skip
        dxa = [SCALING * f(dy) @ f(b) for dy, b in zip(self.dys, self.lora_B)]
        dx = sum(f(dy) @ f(w) + d @ f(a) for dy, w, d, a in zip(self.dys, self.weights, dxa, self.adapters))
        return y, dx, torch.cat(dxa, dim=1)


def run_group(name: str, tokens: int, rank: int, scale: int, device: torch.device) -> list[dict]:
    group = Group(name, tokens, rank, scale, device, torch.bfloat16)
    y_ref, dx_ref, dxa_ref = group.references()
    rows = []
    for scheme in FORWARD:
        err = harness.relative_error(torch.cat(group.forward(scheme), dim=1), y_ref)
        ms = harness.median_ms(lambda: group.forward(scheme), device)
        rows.append({"pass": "forward", "scheme": scheme, "err": err, "ms": ms})
    for scheme in BACKWARD:
        dx, dxa = group.backward(scheme)
        err = max(harness.relative_error(dx, dx_ref), harness.relative_error(dxa, dxa_ref))
        ms = harness.median_ms(lambda: group.backward(scheme), device)
        rows.append({"pass": "backward", "scheme": scheme, "err": err, "ms": ms})
    for row in rows:
        row.update(group=name, tokens=tokens)
    return rows


def layer_rows(rows: list[dict], tokens: int) -> list[dict]:
    """Per scheme, a decoder layer's forward (twice: forward and recompute) plus input gradient."""
    out = []
    for pass_name, schemes, times in (("forward x2", FORWARD, 2), ("backward", BACKWARD, 1)):
        for scheme in schemes:
            picked = [r for r in rows if r["tokens"] == tokens and r["pass"] == pass_name.split()[0] and r["scheme"] == scheme]
            out.append({"group": "layer", "tokens": tokens, "pass": pass_name, "scheme": scheme,
                        "ms": times * sum(r["ms"] for r in picked), "err": max(r["err"] for r in picked)})  # fmt: skip
    return out


def set_vs_update(rows: list[dict]) -> None:
    """``vs_update`` of each row: the ``update`` scheme's time for its group and pass over its own."""
    update = {(r["group"], r["pass"]): r["ms"] for r in rows if r["scheme"] == "update"}
    for row in rows:
        row["vs_update"] = update[row["group"], row["pass"]] / row["ms"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 2048], help="bs 4 and bs 1 at seq 2048")
    parser.add_argument("--rank", type=int, default=harness.LORA_R)
    parser.add_argument("--scale", type=int, default=1, help="divide every feature size (CPU check)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    for tokens in args.tokens:
        group_rows = []
        for name in GROUPS:
            group_rows += run_group(name, tokens, args.rank, args.scale, device)
        group_rows += layer_rows(group_rows, tokens)
        set_vs_update(group_rows)
        rows += group_rows
        print(harness.markdown_table(rows[-len(FORWARD) - len(BACKWARD):], COLUMNS), flush=True)
    notes = [
        "vs_update: the `update` scheme's time over this one (> 1: faster than today). err: max |result - fp32 "
        "reference| / max |reference| over y (forward) or dx and dxa (backward); bf16 rounding is ~4e-3.",
        "layer rows: one of each group, the forward counted twice (forward and recompute of a checkpointed layer).",
    ]
    title = "LoRA's rank-r terms: in-place update, prefill, or inside the frozen GEMM (K/N-concatenated)"
    harness.write_results(args.out, title, harness.run_meta(), rows, COLUMNS, notes)


if __name__ == "__main__":
    main()
