"""GRPO on the GPU: (a) the loss alone, ours vs Liger vs a materialised (TRL-style) loss; (b) one full
GRPO optimizer step of the Llama-3-8B shape under QLoRA with long random completions.

    . benchmarks/gpu_env.sh && python benchmarks/bench_grpo.py --out benchmarks/results/grpo_h200.json

(a) ``loss``: hidden (G, L, H) bf16 requiring grad, the LM head (V, H) bf16 frozen (LoRA leaves it
    frozen), completion ids / mask (random lengths, 90-100% of L) / advantages / reference log-probs,
    beta 0.04, DAPO. Forward + backward: median time of ``--repeats`` after one warm-up, and the peak
    allocated memory above the inputs. The materialised loss is TRL's: the bf16 logits of every
    token, then fp32 log-softmax of the completion tokens; it is run at the full size if it fits, and
    otherwise at the largest number of completions that fits (its arithmetic is printed either way).
(b) ``step``: the Llama-3-8B shape with random weights, NF4 QLoRA r16 on all 7 projections, patched
    (fused kernels) with offload checkpointing; ``G`` completions of ``L`` random tokens after a
    ``--prompt`` token prompt (generation left out): old-policy log-probs skipped (on-policy), the
    reference log-probs with the adapter disabled, then the loss over micro-batches of one completion,
    forward + backward each, then AdamW. Peak allocated / reserved memory and time of the step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import GIB, PeakMemory, is_out_of_memory, model_config, run_meta, write_results  # noqa: E402

LOSS_COLUMNS = ("impl", "completions", "tokens", "fwd_bwd_ms", "peak_above_inputs_gib", "note")
STEP_COLUMNS = ("variant", "completions", "tokens_per_completion", "step_s", "peak_allocated_gib",
                "peak_reserved_gib", "ref_logps_s", "train_s", "loss")


def loss_inputs(generations: int, length: int, hidden_size: int, vocab: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = (torch.randn(generations, length, hidden_size, device="cuda", generator=g) * 0.5).bfloat16()
    weight = (torch.randn(vocab, hidden_size, device="cuda", generator=g) * hidden_size**-0.5).bfloat16()
    ids = torch.randint(0, vocab, (generations, length), device="cuda", generator=g)
    lengths = torch.randint(int(0.9 * length), length + 1, (generations,), device="cuda", generator=g)
    mask = (torch.arange(length, device="cuda") < lengths[:, None]).long()
    advantages = torch.randn(generations, device="cuda", generator=g)
    ref = -torch.rand(generations, length, device="cuda", generator=g) * 12
    return hidden.requires_grad_(), weight, ids, mask, advantages, ref


def materialised_grpo(hidden, weight, ids, mask, advantages, ref, beta=0.04, eps=0.2):
    """TRL's computation: the logits of every token, fp32 log-softmax (row by row, as TRL's
    selective_log_softmax for bf16), then the DAPO loss."""
    logits = hidden @ weight.t()
    logps = torch.stack([torch.log_softmax(row.float(), -1).gather(-1, i[:, None]).squeeze(-1)
                         for row, i in zip(logits, ids)])
    ratio = torch.exp(logps - logps.detach())
    per_token = -torch.min(ratio * advantages[:, None], ratio.clamp(1 - eps, 1 + eps) * advantages[:, None])
    per_token = per_token + beta * (torch.exp(ref - logps) - (ref - logps) - 1)
    return (per_token * mask).sum() / mask.sum()


def time_loss(run, inputs, repeats: int) -> tuple[float, float]:
    hidden = inputs[0]
    baseline = torch.cuda.memory_allocated()
    run(*inputs).backward()  # warm-up (compiles Liger's chunk function)
    hidden.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(*inputs).backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        hidden.grad = None
    peak = torch.cuda.max_memory_allocated() - baseline
    return statistics.median(times) * 1e3, peak / GIB


def bench_loss(args) -> list[dict]:
    from lightning_fastft.rl import FusedLinearGRPOLoss

    rows = []
    ours = FusedLinearGRPOLoss(beta=0.04, loss_type="dapo")
    impls = {"fastft": lambda h, w, i, m, a, r: ours(h, w, i, m, a, None, r)[0]}
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(beta=0.04, loss_type="dapo", use_ref_model=True, chunk_size=1)
        impls["liger"] = lambda h, w, i, m, a, r: liger(h, w, i, m, a, ref_per_token_logps=r)[0]
    except ImportError as error:
        rows.append({"impl": "liger", "note": f"not installed: {error}"})
    impls["materialised (TRL)"] = materialised_grpo
    for name, run in impls.items():
        generations = args.generations
        note = ""
        while generations >= 1:
            inputs = loss_inputs(generations, args.length, args.hidden, args.vocab)
            try:
                ms, peak = time_loss(run, inputs, args.repeats)
                break
            except torch.OutOfMemoryError as error:
                if not is_out_of_memory(error):
                    raise
                del inputs
                torch.cuda.empty_cache()
                note = f"out of memory at {generations} completions"
                generations //= 2
        else:
            rows.append({"impl": name, "note": note})
            continue
        rows.append({"impl": name, "completions": generations, "tokens": generations * args.length,
                     "fwd_bwd_ms": ms, "peak_above_inputs_gib": peak, "note": note})
        print(rows[-1], flush=True)
        del inputs
        torch.cuda.empty_cache()
    return rows


def bench_step(args) -> list[dict]:
    from lightning_fastft.patching import patch_model
    from lightning_fastft.rl import GRPOFineTune
    from lightning_fastft.training.checkpointing import apply_activation_checkpointing
    from harness import build_lora_model

    config = model_config("llama8b", args.layers)
    model = build_lora_model(config, "cuda", "nf4")
    module = GRPOFineTune(model={"model_type": "llama"}, reward_funcs=[lambda prompts, completions, **_: [0.0]],
                          beta=0.04, loss_type="dapo", micro_batch_size=1, max_completion_length=args.length,
                          lora_r=16)
    module.model = model
    module.manual_backward = lambda loss: loss.backward()
    module._trainer = SimpleNamespace(world_size=1, strategy=SimpleNamespace())
    patch_model(module)
    apply_activation_checkpointing(module, checkpointing=args.checkpointing)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)

    g, length, prompt = args.generations, args.length, args.prompt
    gen = torch.Generator(device="cuda").manual_seed(0)
    completion_ids = torch.randint(0, config.vocab_size, (g, length), device="cuda", generator=gen)
    prompt_ids = torch.randint(0, config.vocab_size, (g, prompt), device="cuda", generator=gen)
    lengths = torch.randint(int(0.9 * length), length + 1, (g,), device="cuda", generator=gen)
    completion_mask = (torch.arange(length, device="cuda") < lengths[:, None]).long()
    attention_mask = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
    rollout = {
        "input_ids": torch.cat([prompt_ids, completion_ids], 1), "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1),
        "prompt_width": prompt, "completion_ids": completion_ids, "completion_mask": completion_mask,
    }
    advantages = torch.randn(g, device="cuda", generator=gen)
    rows = []
    for repeat in range(args.step_repeats):
        memory = PeakMemory().start()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with model.disable_adapter():
            ref = module.completion_logps(rollout)
        torch.cuda.synchronize()
        ref_done = time.perf_counter()
        metrics = module._accumulate_gradients(rollout, advantages, None, ref, completion_mask.sum().float())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        memory.stop()
        end = time.perf_counter()
        rows.append({
            "variant": f"8B QLoRA nf4, {args.checkpointing}, repeat {repeat}", "completions": g,
            "tokens_per_completion": prompt + length, "step_s": end - start,
            "peak_allocated_gib": memory.peak_gib, "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
            "ref_logps_s": ref_done - start, "train_s": end - ref_done, "loss": float(metrics["loss"]),
        })
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="loss,step")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--length", type=int, default=20000)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of the 8B shape (default 32)")
    parser.add_argument("--checkpointing", default="offload", choices=("recompute", "offload"))
    parser.add_argument("--step-repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/grpo_h200.json"))
    args = parser.parse_args()
    parts = args.parts.split(",")
    notes = []
    if "loss" in parts:
        rows = bench_loss(args)
        g, l, v = args.generations, args.length, args.vocab
        notes.append(
            f"Materialised arithmetic at {g} x {l} tokens, vocab {v}: bf16 logits {g * l * v * 2 / GIB:.1f} GiB, "
            f"their gradient as much again ({2 * g * l * v * 2 / GIB:.1f} GiB), plus fp32 log-softmax rows."
        )
        write_results(args.out.with_name(args.out.stem + "_loss.json"), "GRPO loss alone (forward + backward)",
                      run_meta(), rows, LOSS_COLUMNS, notes)
    if "step" in parts:
        rows = bench_step(args)
        write_results(args.out.with_name(args.out.stem + "_step.json"),
                      "One GRPO step, Llama-3-8B shape, QLoRA (generation left out)", run_meta(), rows, STEP_COLUMNS)


if __name__ == "__main__":
    main()
