"""The demo (shortened), its tokenizer asset, and the finetune example's command line."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_script
from tokenizers import Tokenizer

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_committed_tokenizer_is_what_the_script_builds():
    make_tokenizer = load_script(EXAMPLES / "assets" / "make_tokenizer.py")
    built = json.loads(make_tokenizer.build_tokenizer().to_str())
    committed = json.loads((EXAMPLES / "assets" / "tokenizer.json").read_text())
    assert built == committed


def test_samples_and_held_out_words():
    demo = load_script(EXAMPLES / "demo.py")
    tokenizer = Tokenizer.from_file(str(demo.TOKENIZER_PATH))
    train, held_out = demo.word_splits(300, 40, 3, 7, seed=5)
    assert len(train) == 300 and len(held_out) == 40 and not set(train) & set(held_out)
    assert all(3 <= len(word) <= 7 for word in train + held_out)

    sample = demo.training_sample(tokenizer, "xkcdq")
    tokens = [tokenizer.id_to_token(i) for i in sample["input_ids"]]
    assert tokens == ["<bos>", "reverse:", *"xkcdq", "answer:", *"qdckx", "<eos>"]
    assert sample["loss_mask"] == [0] * 8 + [1] * 6


# The demo's main() with a user's command line, in a fresh process; prints what main() returns.
RUN_DEMO = """
import json, runpy, sys
sys.argv = {argv!r}
sys.path[0] = {folder!r}  # as `python examples/demo.py` sets it
print("main returned", json.dumps(runpy.run_path(sys.argv[0])["main"]()))
"""


@pytest.mark.subprocess
@pytest.mark.slow
def test_shortened_demo_trains_and_reports_accuracy():
    """Run as users do: a fresh process, on CPU the kernels' PyTorch fallbacks (no Triton interpreter).

    20 steps are far too few for right answers on held-out words (the full demo needs hundreds),
    but the training loss must have left the untrained model's: near-zero logits over the 32-token
    vocabulary give ln 32 = 3.47 (3.50 measured with ``--learning-rate 0``); these 20 steps reach
    3.00 on CPU. The bound ln 32 - 0.2 sits about half-way, so a run that does not learn fails.
    """
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    argv = [str(EXAMPLES / "demo.py"), "--max-steps", "20", "--batch-size", "8", "--max-seq-len", "64",
            "--num-train", "64", "--num-eval", "12", "--no-progress-bar"]  # fmt: skip
    script = RUN_DEMO.format(argv=argv, folder=str(EXAMPLES))
    finished = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    accuracies = re.findall(r"accuracy on 12 held-out words (before|after) fine-tuning: +([0-9.]+)%", finished.stdout)
    assert [when for when, _ in accuracies] == ["before", "after"], finished.stdout
    assert len(re.findall(r"reverse: [a-z]+ +answer: \S* +(ok|wrong)", finished.stdout)) == 5
    returned = json.loads(finished.stdout.split("main returned ", 1)[1].splitlines()[0])
    printed = [float(percent) for _, percent in accuracies]
    assert printed == [round(100 * returned["accuracy_before"], 1), round(100 * returned["accuracy_after"], 1)]
    assert returned["accuracy_before"] == 0.0  # an untrained model reverses no held-out word
    vocab_size = Tokenizer.from_file(str(EXAMPLES / "assets" / "tokenizer.json")).get_vocab_size()
    assert vocab_size == 32
    assert returned["final_loss"] < math.log(vocab_size) - 0.2, returned


def test_finetune_help_lists_the_options(capsys):
    finetune = load_script(EXAMPLES / "finetune.py")
    with pytest.raises(SystemExit) as exit_info:
        finetune.parse_args(["--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    for option in ("--model_name_or_path", "--dataset", "--max_seq_len", "--lora_r", "--quant", "--checkpointing", "--max_steps"):
        assert option in usage


@pytest.mark.subprocess
@pytest.mark.slow
def test_shortened_grpo_demo_reports_rewards(tmp_path):
    """The GRPO demo as users run it (fresh process, no Triton interpreter), shortened: warm start, one
    reward per GRPO step, the accuracies it prints, the reward plot."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    plot = tmp_path / "reward.png"
    argv = [str(EXAMPLES / "grpo_demo.py"), "--sft-steps", "10", "--grpo-steps", "3", "--prompts-per-step", "2",
            "--num-generations", "4", "--num-eval", "20", "--plot", str(plot)]  # fmt: skip
    script = RUN_DEMO.format(argv=argv, folder=str(EXAMPLES))
    finished = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    returned = json.loads(finished.stdout.split("main returned ", 1)[1].splitlines()[0])
    assert len(returned["rewards"]) == 3 and all(0 <= r <= 1 for r in returned["rewards"])
    assert f"after GRPO: {100 * returned['accuracy_after']:.1f}%" in finished.stdout
    assert plot.stat().st_size > 0
