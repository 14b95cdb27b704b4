"""Mixture-of-experts LoRA training on the Qwen3-30B-A3B shape: Hugging Face vs lightning_fastft
(and Liger-Kernel where it patches qwen3_moe), same process, same weights; plus the grouped-GEMM
experts op against the dense arithmetic floor of the active parameters.

Shape (the published Qwen3-30B-A3B ``config.json``; transformers' ``Qwen3MoeConfig()`` defaults
differ: 24 layers, head_dim 2048/32 = 64, ``norm_topk_prob=False``): 48 layers, hidden 2048,
32 query / 4 KV heads of 128, 128 experts, top-8 renormalised, ``moe_intermediate_size`` 768,
vocab 151936, untied LM head. Random bf16 weights are allocated on the meta device and
materialised on the GPU (``to_empty`` + in-place normal draws): ~61 GB at 48 layers, seconds to
build. bf16 LoRA r16 (alpha 16) on the attention projections and the stacked experts (PEFT
``target_parameters``), routers frozen: what :func:`lightning_fastft.qlora.attach_lora` makes of
"all-linear" on this model.

Training rows: random tokens, seq 2048, batch 1 and 4, AdamW on the LoRA parameters; each
implementation's tokens/s (median step after warm-up) and peak CUDA memory (absolute; above
the allocation before the measured steps, which includes AdamW's temporaries; and ``activation_gib``:
one more step's forward + backward peak less parameters, buffers, optimizer state and gradients, the
gradients allocated before it: :func:`activation_peak`). Checkpointing:
Hugging Face's gradient checkpointing for HF/Liger, ours (``--checkpointing``) for fastft.

Experts rows (``--experts-tokens``): one MoE layer's experts, forward + backward (frozen base,
LoRA on both projections), fastft's grouped GEMMs vs Hugging Face's experts module (its default
``grouped_mm`` implementation with PEFT's materialised ``W + B A``), both against the dense floor:
plain ``torch.mm`` with the same rows (tokens x top-k) and the same weight shapes (what one expert
receiving every routed row would cost). FLOPs counted: forward 2·S·3·H·I, backward (input
gradient only, the base is frozen) the same again; LoRA adds 2·S·r·(3H + 3I) each way, not counted.

    source benchmarks/gpu_env.sh
    python benchmarks/moe_bench.py --layers 8 --out benchmarks/results/moe_qwen3_30b_a3b_8l
    python benchmarks/moe_bench.py --out benchmarks/results/moe_qwen3_30b_a3b     # all 48 layers
    python benchmarks/moe_bench.py --layers 8 --impls liger --out benchmarks/results/moe_liger_8l
    python benchmarks/moe_bench.py --batches 1 --impls hf fastft --experts-tokens --memory-trace  # no experts rows
"""

from __future__ import annotations

import argparse
import gc
import inspect
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

QWEN3_30B_A3B = {
    "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
    "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
    "intermediate_size": 6144, "norm_topk_prob": True, "vocab_size": 151936, "max_position_embeddings": 40960,
    "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "output_router_logits": True, "router_aux_loss_coef": 0.001, "use_cache": False,
}  # fmt: skip
LORA_R = 16
TRAIN_COLUMNS = (
    "impl", "batch", "seq", "layers", "tok_s", "step_s", "peak_gib", "above_start_gib", "activation_gib", "loss", "note",
)  # fmt: skip
EXPERT_COLUMNS = ("impl", "tokens", "rows", "fwd_ms", "fwd_bwd_ms", "tflops", "dense_floor_ms", "vs_dense_floor")


def qwen3_moe_config(layers: int):
    from transformers import AutoConfig

    return AutoConfig.for_model("qwen3_moe", **{**QWEN3_30B_A3B, "num_hidden_layers": layers})


def build_model(config, device: str = "cuda"):
    """Random bf16 weights on ``device``: built on the meta device, then materialised in place."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:  # RMSNorm weights
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
        rotary = model.model.rotary_emb  # buffers are not parameters: rebuild the rotary embedding
        with torch.device(device):
            model.model.rotary_emb = type(rotary)(config)
    model.config.use_cache = False
    return model


def attach_expert_lora(model):
    from lightning_fastft.qlora import attach_lora

    return attach_lora(model, lora_r=LORA_R, lora_alpha=LORA_R, lora_dropout=0.0)


def train_rows(
    model, impl: str, batch: int, seq: int, steps: int, warmup: int, layers: int, note: str, profile: bool = False,
    memory_trace: bool = False,
) -> dict:  # fmt: skip
    vocab = QWEN3_30B_A3B["vocab_size"]
    generator = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), device="cuda", generator=generator)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    model.train()

    def forward_backward():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    def update():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step():
        loss = forward_backward()
        update()
        return loss

    row = {"impl": impl, "batch": batch, "seq": seq, "layers": layers, "note": note}
    try:
        for _ in range(warmup):
            step()
        memory = harness.PeakMemory().start()
        stopwatch = harness.Stopwatch("cuda")
        for _ in range(steps):
            with stopwatch:
                loss = step()
        memory.stop()
        step_s = stopwatch.median()
        row |= {
            "tok_s": batch * seq / step_s, "step_s": step_s, "peak_gib": memory.peak_gib,
            "above_start_gib": memory.above_baseline / harness.GIB, "loss": loss.item(),
            "activation_gib": activation_peak(model, optimizer, forward_backward) / harness.GIB,
        }  # fmt: skip
        update()
        if memory_trace:  # what is allocated at the forward + backward's peak, by where it was allocated
            _, where = harness.record_peak(forward_backward)
            update()
            row["peak_where"] = where[:20]
            print(f"== {impl} bs {batch}: live at the forward + backward peak (allocated during it)", flush=True)
            for item in where[:20]:
                print(f"   {item['mib']:9.1f} MiB  x{item['count']:<5d} {item['where']}", flush=True)
        if profile:  # where the step's time goes: GPU kernels vs wall time, host functions, host syncs
            from profile_step import host_profile, kernel_profile

            row |= kernel_profile(step, 20) | host_profile(step, 30)
            print(f"== {impl} bs {batch}: GPU kernels {row['gpu_kernel_s']:.4f} s of {row['wall_s']:.4f} s "
                  f"(busy {row['gpu_busy']:.2f})", flush=True)  # fmt: skip
            for kernel in row["top_kernels"]:
                print(f"   {kernel['s'] * 1e3:8.2f} ms  x{kernel['calls']:<5d} {kernel['name']}")
            print("\n".join("   " + line for line in row["cprofile"]))
            for where, count in row["syncs"]:
                print(f"   sync x{count}: {where}")
    except torch.OutOfMemoryError:
        row["note"] = (note + "; " if note else "") + "OOM"
    optimizer.state.clear()
    gc.collect()
    torch.cuda.empty_cache()
    return row


def activation_peak(model, optimizer, forward_backward) -> int:
    """Peak bytes of one forward + backward above the model's state: the peak allocated during
    ``forward_backward()`` minus the parameters, buffers, optimizer state and gradients. The gradients
    are allocated (zeroed) before it starts, so that the peak is the activations' wherever it falls
    (an eager backward allocates them as it goes, a graphed layer's are its graph's buffers, held from
    the capture on and handed out as ``.grad``: left to the step, an eager peak at the backward's end
    would hide the activations behind the gradients allocated by then). What remains is activations, saved tensors and transients — CUDA graphs' static
    buffers and their whole pool included (:class:`harness.PeakMemory`). The caller steps the optimizer after."""
    from lightning_fastft.training.cuda_graphs import cuda_graphs_of

    graphed = {  # their gradients are the graphs' buffers, allocated at the capture: .grad after the backward
        parameter
        for stack in cuda_graphs_of(model) if stack.graphs is not None
        for layer, graph in zip(stack.layers, stack.graphs.functions) if graph is not None
        for parameter in layer.parameters()
    }  # fmt: skip
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.grad is None and parameter not in graphed:
            parameter.grad = torch.zeros_like(parameter)
    state = [*model.parameters(), *model.buffers()]
    state += [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    memory = harness.PeakMemory().start()
    forward_backward()
    memory.stop()
    tensors = state + [p.grad for p in model.parameters() if p.grad is not None]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.is_cuda}
    return memory.peak - sum(storages.values())


def expert_rows(model, token_counts: list[int], profile: bool = False) -> list[dict]:
    """One layer's experts, fwd+bwd: fastft grouped GEMMs, HF's experts module, the dense floor."""
    from lightning_fastft.kernels.moe import moe_experts
    from lightning_fastft.patching.moe import _fused_experts

    block = model.get_base_model().model.layers[0].mlp
    experts, gate_up_lora, down_lora = _fused_experts(block.experts)
    hidden_size, inter = experts.gate_up_proj.shape[2], experts.gate_up_proj.shape[1] // 2
    top_k, n_experts = QWEN3_30B_A3B["num_experts_per_tok"], QWEN3_30B_A3B["num_experts"]
    w_gate_up, w_down = experts.gate_up_proj[0].detach(), experts.down_proj[0].detach()
    rows = []
    for tokens in token_counts:
        generator = torch.Generator(device="cuda").manual_seed(2)
        hidden = torch.randn(tokens, hidden_size, device="cuda", dtype=torch.bfloat16, generator=generator)
        hidden.requires_grad_()
        logits = torch.randn(tokens, n_experts, device="cuda", generator=generator)
        weights, index = torch.softmax(logits, -1).topk(top_k)
        weights = (weights / weights.sum(-1, keepdim=True)).to(torch.bfloat16)
        dout = torch.randn(tokens, hidden_size, device="cuda", dtype=torch.bfloat16, generator=generator)
        s = tokens * top_k
        flops = 2 * (2 * s * 3 * hidden_size * inter)  # forward + input-gradient backward

        def fastft_forward(hidden=hidden, index=index, weights=weights):
            return moe_experts(
                hidden, index, weights, experts.gate_up_proj, experts.down_proj, "silu", gate_up_lora, down_lora
            )

        def hf_forward(hidden=hidden, index=index, weights=weights):
            return block.experts(hidden, index, weights)

        x = torch.randn(s, hidden_size, device="cuda", dtype=torch.bfloat16)
        h = torch.randn(s, inter, device="cuda", dtype=torch.bfloat16)
        du = torch.randn(s, 2 * inter, device="cuda", dtype=torch.bfloat16)
        dd = torch.randn(s, hidden_size, device="cuda", dtype=torch.bfloat16)

        def dense_floor(x=x, h=h, du=du, dd=dd):
            x @ w_gate_up.t()
            h @ w_down.t()
            du @ w_gate_up
            dd @ w_down

        dense_ms = harness.launch_ms(dense_floor)
        for impl, forward in (("fastft", fastft_forward), ("hf", hf_forward)):
            row = {"impl": impl, "tokens": tokens, "rows": s, "dense_floor_ms": dense_ms}
            try:
                row["fwd_ms"] = harness.launch_ms(forward)
                row["fwd_bwd_ms"] = harness.launch_ms(
                    lambda forward=forward, dout=dout: torch.autograd.backward(forward(), dout), grad_to_none=[hidden]
                )
                row["tflops"] = flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12
                row["vs_dense_floor"] = dense_ms / row["fwd_bwd_ms"]
                if profile:  # the forward + backward's kernels, summed per name
                    from profile_step import kernel_profile

                    fwd_bwd = (lambda forward=forward, dout=dout: torch.autograd.backward(forward(), dout))
                    row["top_kernels"] = kernel_profile(fwd_bwd, 15)["top_kernels"]
                    print(f"== experts {impl} {tokens} tokens: {row['fwd_bwd_ms']:.3f} ms fwd + bwd", flush=True)
                    for kernel in row["top_kernels"]:
                        print(f"   {kernel['s'] * 1e3:8.3f} ms  x{kernel['calls']:<3d} {kernel['name']}", flush=True)
            except torch.OutOfMemoryError:
                row["fwd_ms"] = "OOM"
            rows.append(row)
            gc.collect()
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=48, help="decoder layers (48: the full model, ~61 GB)")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 4], help="none given: no training rows")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--impls", nargs="+", default=["hf", "fastft"], choices=["hf", "fastft", "fastft_graphs", "liger"],
                        help="fastft_graphs: fastft with cuda_graphs=True (after fastft, on the same patched model)")
    parser.add_argument("--checkpointing", default="recompute", choices=["none", "recompute", "offload", "auto"])
    parser.add_argument("--memory-budget-gib", type=float,
                        help="checkpointing auto: the budget (default: the device's free memory minus a margin)")
    parser.add_argument("--experts-tokens", type=int, nargs="*", default=[2048, 8192],
                        help="token counts of the experts rows (none given: no experts rows)")
    parser.add_argument("--lora-dtype", default="fp32", choices=["fp32", "bf16"],
                        help="bf16: the LoRA factors cast to bf16, as Lightning's bf16-true precision does")
    parser.add_argument("--profile", action="store_true",
                        help="profile one step per row (kernels, host, syncs) and each experts row's kernels")
    parser.add_argument("--memory-trace", action="store_true",
                        help="per row, what one forward + backward has allocated at its peak, by allocation site")
    parser.add_argument("--out", type=Path, default=harness.RESULTS_DIR / "moe_qwen3_30b_a3b")
    args = parser.parse_args()
    if "liger" in args.impls and len(args.impls) > 1:
        parser.error("run --impls liger alone: Liger-Kernel rebinds transformers module globals")

    from lightning_fastft.patching import patch_model
    from lightning_fastft.training.checkpointing import checkpoint_planner_of

    config = qwen3_moe_config(args.layers)
    with harness.Stopwatch("cuda") as build, torch.device("cuda"):  # LoRA factors created on the GPU
        model = attach_expert_lora(build_model(config))
    if args.lora_dtype == "bf16":
        model.to(torch.bfloat16)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    rows, expert_table = [], []
    impls = sorted(args.impls, key=["hf", "liger", "fastft", "fastft_graphs"].index)  # HF before fastft patches
    hf_checkpointing = "none" if args.checkpointing == "none" else "hf"
    for impl in impls:
        if impl == "liger":
            import liger_kernel.transformers as liger

            if not hasattr(liger, "apply_liger_kernel_to_qwen3_moe"):
                rows.append({"impl": "liger", "note": "this Liger-Kernel has no qwen3_moe patch"})
                continue
            apply = liger.apply_liger_kernel_to_qwen3_moe
            wanted = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False}
            wanted["fused_linear_cross_entropy"] = True
            accepted = inspect.signature(apply).parameters
            apply(model=model.get_base_model(), **{k: v for k, v in wanted.items() if k in accepted})
        if impl == "fastft":
            if args.checkpointing == "auto":
                print(patch_model(model, checkpointing="auto", memory_budget_gib=args.memory_budget_gib), flush=True)
            else:
                print(patch_model(model), flush=True)
                harness.set_checkpointing(model, args.checkpointing)
            expert_table = expert_rows(model, args.experts_tokens, args.profile) if args.experts_tokens else []
        elif impl == "fastft_graphs":
            graphs = {} if args.checkpointing == "none" else {"checkpointing": args.checkpointing}
            if args.checkpointing == "auto":
                graphs["memory_budget_gib"] = args.memory_budget_gib
            print(patch_model(model, cuda_graphs=True, **graphs), flush=True)
        else:
            harness.set_checkpointing(model, hf_checkpointing)
        mode = args.checkpointing if impl.startswith("fastft") else hf_checkpointing
        for batch in args.batches:
            rows.append(
                train_rows(model, impl, batch, args.seq, args.steps, args.warmup, args.layers,
                           f"checkpointing {mode}, LoRA {args.lora_dtype}" + (", CUDA graphs" if impl == "fastft_graphs" else ""),
                           args.profile, args.memory_trace)  # fmt: skip
            )
            planner = checkpoint_planner_of(model)
            if impl.startswith("fastft") and planner is not None:
                plan = planner.plan
                rows[-1]["note"] += (f" (plan: {plan.count(None)} layers kept, {plan.count('recompute')} recomputed, "
                                     f"{plan.count('offload')} offloaded; budget {args.memory_budget_gib} GiB)")  # fmt: skip
            print(rows[-1], flush=True)
    notes = [
        (
            f"Model: {total / 1e9:.2f}B parameters ({trainable / 1e6:.0f}M trainable LoRA r{LORA_R}), "
            f"built in {build.seconds:.1f} s."
        ),
        "",
        "Experts (one layer, fwd + input-gradient bwd, LoRA on both projections, frozen base):",
        "",
        harness.markdown_table(expert_table, EXPERT_COLUMNS),
    ]
    for row in rows:
        if row.get("peak_where"):
            notes += ["", f"Live at the forward + backward peak, {row['impl']} bs {row['batch']} (allocated during it):", ""]
            notes.append(harness.markdown_table(row["peak_where"], ("mib", "count", "where")))
    meta = harness.run_meta(layers=args.layers, checkpointing=args.checkpointing, lora_dtype=args.lora_dtype,
                            experts=expert_table)  # fmt: skip
    harness.write_results(args.out, f"Qwen3-30B-A3B shape, {args.layers} layers: MoE LoRA training", meta, rows,
                          TRAIN_COLUMNS, notes)  # fmt: skip
    print(Path(args.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
