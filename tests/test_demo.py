"""The demo (shortened), its tokenizer asset, and the finetune example's command line."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_script

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_committed_tokenizer_is_what_the_script_builds():
    make_tokenizer = load_script(EXAMPLES / "assets" / "make_tokenizer.py")
    built = json.loads(make_tokenizer.build_tokenizer().to_str())
    committed = json.loads((EXAMPLES / "assets" / "tokenizer.json").read_text())
    assert built == committed


def test_samples_and_held_out_words():
    demo = load_script(EXAMPLES / "demo.py")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(demo.TOKENIZER_PATH))
    train, held_out = demo.word_splits(300, 40, 3, 7, seed=5)
    assert len(train) == 300 and len(held_out) == 40 and not set(train) & set(held_out)
    assert all(3 <= len(word) <= 7 for word in train + held_out)

    sample = demo.training_sample(tokenizer, "xkcdq")
    tokens = [tokenizer.id_to_token(i) for i in sample["input_ids"]]
    assert tokens == ["<bos>", "reverse:", *"xkcdq", "answer:", *"qdckx", "<eos>"]
    assert sample["loss_mask"] == [0] * 8 + [1] * 6


def test_shortened_demo_completes_and_reports_accuracy():
    """Run as users do: a fresh process, on CPU the kernels' PyTorch fallbacks (no Triton interpreter)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, str(EXAMPLES / "demo.py"), "--max-steps", "3", "--batch-size", "8", "--max-seq-len", "64",
               "--num-train", "64", "--num-eval", "12", "--no-progress-bar"]  # fmt: skip
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    accuracies = re.findall(r"accuracy on 12 held-out words (before|after) fine-tuning: +([0-9.]+)%", finished.stdout)
    assert [when for when, _ in accuracies] == ["before", "after"], finished.stdout
    assert all(0.0 <= float(percent) <= 100.0 for _, percent in accuracies)
    assert len(re.findall(r"reverse: [a-z]+ +answer: \S* +(ok|wrong)", finished.stdout)) == 5


def test_finetune_help_lists_the_options(capsys):
    finetune = load_script(EXAMPLES / "finetune.py")
    with pytest.raises(SystemExit) as exit_info:
        finetune.parse_args(["--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    for option in ("--model_name_or_path", "--dataset", "--max_seq_len", "--lora_r", "--quant", "--checkpointing", "--max_steps"):
        assert option in usage
