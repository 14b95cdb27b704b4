"""GRPO demo: the word-reversal Llama of ``examples/demo.py`` improved by reinforcement learning, offline.

    python examples/grpo_demo.py            # about 75 s on two CPU cores

1. A short supervised warm start (LoRA, as in ``demo.py`` but only ``--sft-steps`` steps) leaves a
   policy that reverses some words right and most wrong.
2. GRPO (:class:`lightning_fastft.rl.GRPOFineTune`, ``Trainer(strategy="fastft")``) then samples
   ``--num-generations`` answers per prompt, scores them with
   :func:`lightning_fastft.rl.reference_match` (1 for the exact reversal, partial credit for letters
   in place) and trains the same LoRA adapter on the group-normalised advantages.

It prints the mean reward of the first and last GRPO steps and the greedy exact-match accuracy on
held-out words before and after GRPO, and plots the reward per step to ``--plot`` (a PNG; needs
matplotlib, which the ``dev`` extra installs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
import demo  # noqa: E402  (examples/demo.py: the task, tokenizer and SFT data)

import lightning_fastft  # noqa: E402,F401  (registers the fastft strategies)
from lightning_fastft.data import PackedCollator  # noqa: E402
from lightning_fastft.module import CausalLMFineTune  # noqa: E402
from lightning_fastft.rl import GRPOFineTune, PromptDataModule, reference_match  # noqa: E402

ASSETS = str(demo.TOKENIZER_PATH.parent)  # tokenizer.json + tokenizer_config.json


class RewardHistory(pl.Callback):
    """The mean reward of every GRPO step."""

    def __init__(self) -> None:
        self.rewards: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if "reward" in trainer.callback_metrics:
            self.rewards.append(float(trainer.callback_metrics["reward"]))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="GRPO on the word-reversal demo model.")
    parser.add_argument("--sft-steps", type=int, default=120, help="supervised warm-start steps")
    parser.add_argument("--grpo-steps", type=int, default=150)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--num-generations", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--grpo-learning-rate", type=float, default=2e-4)
    parser.add_argument("--temperature", type=float, default=0.3)
    parser.add_argument("--num-eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="outputs/grpo_demo_reward.png", help="PNG of the reward curve ('' for none)")
    return parser.parse_args(argv)


def trainer(max_steps: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    on_gpu = torch.cuda.is_available()
    return pl.Trainer(
        strategy="fastft", accelerator="gpu" if on_gpu else "cpu", devices=1,
        precision="bf16-true" if on_gpu else "32-true", max_steps=max_steps, callbacks=callbacks,
        logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
        log_every_n_steps=1,
    )


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the demo; returns the accuracies, the per-step rewards and the first/last reward means."""
    args = parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    tokenizer = Tokenizer.from_file(str(demo.TOKENIZER_PATH))
    train_words, eval_words = demo.word_splits(20000, args.num_eval, 3, 8, args.seed)
    config = demo.demo_model_config(tokenizer.get_vocab_size())
    lora = {"lora_r": 32, "lora_alpha": 64, "init_seed": args.seed}

    sft = CausalLMFineTune(model=config, learning_rate=args.learning_rate, **lora)
    loader = DataLoader(
        [demo.training_sample(tokenizer, word) for word in train_words[: args.sft_steps * 32]],
        batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(args.seed),
        collate_fn=PackedCollator(128, pad_token_id=tokenizer.token_to_id(demo.PAD)),
    )
    trainer(args.sft_steps, []).fit(sft, loader)

    grpo = GRPOFineTune(
        model=config, tokenizer=ASSETS, reward_funcs=[reference_match], num_generations=args.num_generations,
        max_completion_length=10, temperature=args.temperature, learning_rate=args.grpo_learning_rate,
        loss_type="dapo", beta=0.0, **lora,
    )
    grpo.configure_model()
    grpo.load_state_dict(sft.state_dict())  # the warm-started adapter (same frozen base: same init_seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    grpo.model.to(device)
    accuracy_before = demo.exact_match_accuracy(grpo.model, tokenizer, eval_words, device)
    print(f"exact-match accuracy on {len(eval_words)} held-out words after the SFT warm start: {accuracy_before:.1%}")

    prompts = [
        {"prompt": f"{demo.BOS}reverse: {word} answer:", "answer": word[::-1]}
        for word in train_words[-args.grpo_steps * args.prompts_per_step :]
    ]
    history = RewardHistory()
    trainer(args.grpo_steps, [history]).fit(
        grpo, PromptDataModule(dataset=prompts, batch_size=args.prompts_per_step, seed=args.seed)
    )
    grpo.model.to(device)
    accuracy_after = demo.exact_match_accuracy(grpo.model, tokenizer, eval_words, device)
    window = max(1, len(history.rewards) // 5)
    first, last = history.rewards[:window], history.rewards[-window:]
    result = {
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "rewards": history.rewards,
        "reward_first": sum(first) / len(first),
        "reward_last": sum(last) / len(last),
    }
    print(f"mean reward of the first {window} GRPO steps: {result['reward_first']:.3f}, "
          f"of the last {window}: {result['reward_last']:.3f}")
    print(f"exact-match accuracy on {len(eval_words)} held-out words after GRPO: {accuracy_after:.1%}")
    if args.plot:
        plot_rewards(history.rewards, Path(args.plot))
    return result


def plot_rewards(rewards: list[float], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib, or the dev extra): no reward plot")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(rewards) + 1), rewards, marker=".", label="mean reward of the step")
    if len(rewards) >= 5:
        smooth = torch.tensor(rewards).unfold(0, 5, 1).mean(1).tolist()
        ax.plot(range(5, len(rewards) + 1), smooth, label="moving mean (5 steps)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward (reference_match)")
    ax.set_title("GRPO on the word-reversal demo")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"reward curve: {path}")


if __name__ == "__main__":
    main()
