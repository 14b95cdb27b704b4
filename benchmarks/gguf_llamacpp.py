"""A trained model in the real llama.cpp vs Hugging Face: perplexity on held-out text and greedy answers,
per GGUF type (f16, q8_0, q6_k, q5_k_m, q4_k_m).

    python benchmarks/gguf_llamacpp.py --out benchmarks/results/gguf_llamacpp_demo

The demo's task (examples/demo.py: reverse a word, word-level tokenizer) trained on CPU with the
demo's own pieces (LoRA through ``Trainer(strategy="fastft")``, packed rows) for two shapes: the
demo's model (hidden 128: no row is a k-quant width, so the k-quant files hold llama.cpp's fallback
types) and a 256-wide variant whose matrices all are (every type really k-quantised). Held-out text:
the held-out words' full samples (``<bos>reverse: w answer: r<eos>``); perplexity over every token
after ``<bos>``. HF runs fp32. llama.cpp is node-llama-cpp 3.21.1 (``scripts/install_llamacpp.sh``).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = load(ROOT / "examples" / "demo.py", "demo")
client = load(ROOT / "tests" / "llamacpp_client.py", "llamacpp_client")

DTYPES = ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m"]
SHAPES = {
    "demo (hidden 128)": {},
    "demo-256 (hidden 256)": {"hidden_size": 256, "intermediate_size": 768},
}


def train(config: dict, tokenizer, train_words, args):
    from lightning_fastft.data import PackedCollator
    from lightning_fastft.module import CausalLMFineTune

    pl.seed_everything(args.seed, verbose=False)
    module = CausalLMFineTune(model=config, lora_r=args.lora_r, lora_alpha=2 * args.lora_r, learning_rate=args.learning_rate)
    loader = DataLoader(
        [demo.training_sample(tokenizer, word) for word in train_words],
        batch_size=32,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
        collate_fn=PackedCollator(128, pad_token_id=tokenizer.token_to_id(demo.PAD)),
    )
    trainer = pl.Trainer(
        strategy="fastft", accelerator="cpu", devices=1, precision="32-true", max_steps=args.steps,
        logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
    )  # fmt: skip
    trainer.fit(module, loader)
    return module.model.eval()


@torch.no_grad()
def hf_logprobs(model, ids: list[int]) -> list[float]:
    logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return [logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def perplexity(logprob_lists) -> float:
    values = [v for values in logprob_lists for v in values]
    return math.exp(-sum(values) / len(values))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lora-r", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--num-eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", default=None, help="results path: <out>.json and <out>.md")
    args = parser.parse_args(argv)
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from lightning_fastft.export import export_gguf

    tokenizer = Tokenizer.from_file(str(demo.TOKENIZER_PATH))
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(demo.TOKENIZER_PATH), bos_token=demo.BOS, eos_token=demo.EOS, unk_token="<unk>", pad_token=demo.PAD
    )
    train_words, eval_words = demo.word_splits(20000, args.num_eval, 3, 8, args.seed)
    samples = [demo.prompt_ids(tokenizer, w) + demo.answer_ids(tokenizer, w) for w in eval_words]
    prompts = [demo.prompt_ids(tokenizer, w) for w in eval_words]
    answers = [demo.answer_ids(tokenizer, w)[:-1] for w in eval_words]  # llama.cpp stops at <eos>, not returned
    rows = []
    for shape in args.shapes:
        config = {**demo.demo_model_config(tokenizer.get_vocab_size()), **SHAPES[shape]}
        with harness.Stopwatch() as watch:
            model = train(config, tokenizer, train_words, args)
        hf = [hf_logprobs(model, ids) for ids in samples]
        hf_greedy = [
            demo.greedy_continuation(model, torch.tensor([p]), len(a) + 1)[0].tolist() for p, a in zip(prompts, answers)
        ]
        hf_greedy = [g[: g.index(tokenizer.token_to_id(demo.EOS))] if tokenizer.token_to_id(demo.EOS) in g else g for g in hf_greedy]
        rows.append({
            "model": shape, "runtime": "HF fp32", "perplexity": round(perplexity(hf), 4), "exact_match": round(
                sum(g == a for g, a in zip(hf_greedy, answers)) / len(answers), 3), "same_as_hf": 1.0,
            "train_s": round(watch.seconds, 1),
        })  # fmt: skip
        print(rows[-1])
        with tempfile.TemporaryDirectory() as folder:
            jobs = []
            for dtype in DTYPES:
                path = export_gguf(model, Path(folder) / f"{dtype}.gguf", dtype=dtype, tokenizer=hf_tokenizer)
                jobs.append({"model": str(path), "logprobs": samples,
                             "greedy": [{"ids": p, "n": len(a) + 1} for p, a in zip(prompts, answers)]})  # fmt: skip
            answers_by_dtype = client.llamacpp(jobs, timeout=1800)
        for dtype, answer in zip(DTYPES, answers_by_dtype):
            greedy = answer["greedy"]
            rows.append({
                "model": shape, "runtime": f"llama.cpp {dtype}", "perplexity": round(perplexity(answer["logprobs"]), 4),
                "exact_match": round(sum(g == a for g, a in zip(greedy, answers)) / len(answers), 3),
                "same_as_hf": round(sum(g == h for g, h in zip(greedy, hf_greedy)) / len(answers), 3),
            })  # fmt: skip
            print(rows[-1])
    if args.out:
        harness.write_results(
            Path(args.out).with_suffix(".json"),
            "A trained model in llama.cpp vs HF: held-out perplexity and greedy answers per GGUF type",
            harness.run_meta(steps=args.steps, num_eval=args.num_eval),
            rows,
            ["model", "runtime", "perplexity", "exact_match", "same_as_hf", "train_s"],
            notes=[
                "perplexity: over every token after <bos> of the held-out samples `reverse: w answer: r<eos>`;",
                "exact_match: greedy answer == reversed word; same_as_hf: greedy answer == HF fp32's greedy answer.",
                "The demo's 128-wide rows are not k-quant widths: its k-quant files hold llama.cpp's fallback types "
                "(Q5_0 / Q5_1 / Q8_0, F16 for rows of 344); the 256-wide variant is k-quantised throughout.",
            ],
            integers_from=1e6,  # perplexities with 3 decimals
        )
    return rows


if __name__ == "__main__":
    main()
