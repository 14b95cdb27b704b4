"""``examples/finetune.py`` end to end, offline: a tiny random Llama and tokenizer saved to disk, local data."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from helpers import load_script, quiet_trainer

EXAMPLES = Path(__file__).parents[1] / "examples"
PROMPTS = ["reverse: abc answer:", "reverse: hello answer:", "reverse: xkcdq answer:", "reverse: lightning answer:"]
RESPONSES = ["cba", "olleh", "qdckx", "gninthgil"]


@pytest.fixture(scope="module")
def finetune():
    return load_script(EXAMPLES / "finetune.py")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random-weight Llama with the demo's word-level tokenizer, saved like a hub checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(EXAMPLES / "assets" / "tokenizer.json"),
        pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
    )  # fmt: skip
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(11)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _rows(repeat: int) -> dict[str, list[str]]:
    prompts, responses = PROMPTS * repeat, RESPONSES * repeat
    return {"prompt": prompts, "response": responses, "text": [f"{p} {r}" for p, r in zip(prompts, responses)]}


def test_load_rows_reads_data_files_and_saved_datasets(finetune, tmp_path):
    import datasets

    rows = _rows(2)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(dict(zip(rows, values))) + "\n" for values in zip(*rows.values())))
    datasets.Dataset.from_dict(rows).to_csv(str(tmp_path / "rows.csv"), index=False)
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    split = datasets.DatasetDict({"validation": datasets.Dataset.from_dict(_rows(1))})
    split.save_to_disk(str(tmp_path / "saved_dict"))

    for path, split_name, expected in [
        (jsonl, "train", rows), (tmp_path / "rows.csv", "train", rows),
        (tmp_path / "saved", "train", rows), (tmp_path / "saved_dict", "validation", _rows(1)),
    ]:  # fmt: skip
        args = finetune.parse_args(["--model_name_or_path", "unused", "--dataset", str(path), "--split", split_name])
        loaded = finetune.load_rows(args)
        assert {name: loaded[name] for name in expected} == expected, path


def test_tokenize_rows_masks_prompts_and_ends_with_eos(finetune, model_dir):
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = datasets.Dataset.from_dict(_rows(1))
    pair_args = finetune.parse_args(
        ["--model_name_or_path", "x", "--dataset", "x", "--prompt_column", "prompt", "--response_column", "response"]
    )
    for sample, prompt, response in zip(finetune.tokenize_rows(dataset, tokenizer, pair_args), PROMPTS, RESPONSES):
        prompt_len = len(tokenizer(prompt)["input_ids"])
        assert sample["loss_mask"] == [0] * prompt_len + [1] * (len(response) + 1)
        assert sample["input_ids"][-1] == tokenizer.eos_token_id
        assert tokenizer.decode(sample["input_ids"][prompt_len:-1]) == response

    text_args = finetune.parse_args(["--model_name_or_path", "x", "--dataset", "x"])
    for sample in finetune.tokenize_rows(dataset, tokenizer, text_args):
        assert sample["loss_mask"] == [1] * len(sample["input_ids"])
        assert sample["input_ids"][-1] == tokenizer.eos_token_id


def test_missing_dataset_column_names_it_and_the_columns(finetune, model_dir, tmp_path):
    data_file = tmp_path / "pairs.json"
    rows = _rows(1)
    data_file.write_text(json.dumps([dict(zip(rows, values)) for values in zip(*rows.values())]))
    common = ["--model_name_or_path", str(model_dir), "--dataset", str(data_file)]
    columns = r"; its columns are \['prompt', 'response', 'text'\]"
    with pytest.raises(SystemExit, match=r"no column --response_column 'answer'" + columns):
        finetune.main([*common, "--prompt_column", "prompt", "--response_column", "answer"])
    with pytest.raises(SystemExit, match=r"no column --text_column 'body'" + columns):
        finetune.main([*common, "--text_column", "body"])
    with pytest.raises(SystemExit, match="--response_column needs --prompt_column"):  # not silently ignored
        finetune.main([*common, "--response_column", "response"])


def test_missing_model_directory_names_the_path(finetune, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(SystemExit, match=re.escape(f"--model_name_or_path {missing}: no such model directory")):
        finetune.main(["--model_name_or_path", str(missing), "--dataset", "unused"])
    weights_file = tmp_path / "model.safetensors"
    weights_file.write_bytes(b"")
    with pytest.raises(SystemExit, match="a file, not a model directory"):
        finetune.main(["--model_name_or_path", str(weights_file), "--dataset", "unused"])


def test_module_builds_the_lora_model_and_trains_it_in_training_mode(model_dir, device):
    """The example builds its model through CausalLMFineTune (so the saved hyper-parameters describe
    it); ``from_pretrained`` returns eval mode, and training must not run with dropout and the fused
    loss off."""
    from lightning.pytorch.callbacks import Callback

    from lightning_fastft.module import CausalLMFineTune

    module = CausalLMFineTune(model=str(model_dir), lora_r=4)
    seen = []

    class TrainingMode(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(all(m.training for m in pl_module.model.modules()))

    batch = {"input_ids": torch.randint(4, 30, (2, 9)), "labels": torch.randint(4, 30, (2, 9))}
    loader = torch.utils.data.DataLoader([batch], batch_size=None)
    quiet_trainer(device, max_steps=1, callbacks=[TrainingMode()]).fit(module, loader)
    assert seen == [True]
    assert module.hparams.model == str(model_dir) and module.hparams.lora_r == 4
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) > 0
    assert all("lora_" in name for name, p in module.named_parameters() if p.requires_grad)


@pytest.fixture
def as_users_run(monkeypatch):
    """On CPU, the kernels' PyTorch fallbacks as users get them (the Triton interpreter is far slower
    and the kernels have their own tests); on CUDA the kernels themselves."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _lora_b_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return {name: tensor for name, tensor in weights.items() if "lora_B" in name}


def test_lora_prompt_response_json_with_merged_export(finetune, model_dir, tmp_path, as_users_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data_file = tmp_path / "pairs.json"
    rows = _rows(6)
    data_file.write_text(json.dumps([dict(zip(rows, values)) for values in zip(*rows.values())]))
    output_dir = tmp_path / "out"
    metrics = finetune.main([
        "--model_name_or_path", str(model_dir), "--dataset", str(data_file),
        "--prompt_column", "prompt", "--response_column", "response",
        "--max_seq_len", "48", "--batch_size", "2", "--lora_r", "4", "--learning_rate", "1e-2", "--warmup_steps", "1",
        "--checkpointing", "recompute", "--max_steps", "3", "--output_dir", str(output_dir), "--save_merged",
    ])  # fmt: skip
    assert math.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0

    saved = {path.name for path in output_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= saved
    lora_b = _lora_b_weights(output_dir)  # LoRA B starts at zero: non-zero means the adapter trained
    assert lora_b and all(weight.abs().max() > 0 for weight in lora_b.values())

    # The merged checkpoint is the base with the saved adapter folded in.
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, output_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(output_dir / "merged", dtype=torch.float32).eval()
    merged_vocab = AutoTokenizer.from_pretrained(output_dir / "merged").get_vocab()
    assert merged_vocab == AutoTokenizer.from_pretrained(model_dir).get_vocab()
    input_ids = torch.randint(4, base.config.vocab_size, (2, 13))
    with torch.no_grad():
        expected, got = adapted(input_ids=input_ids).logits, merged(input_ids=input_ids).logits
        with adapted.disable_adapter():
            untrained = adapted(input_ids=input_ids).logits
    tolerance = 2e-2 * expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=tolerance)
    assert (untrained - expected).abs().max() > 5 * tolerance  # the adapter changes the outputs


def test_qlora_text_column_saved_dataset_offload_accumulation(finetune, model_dir, tmp_path, as_users_run):
    import datasets

    datasets.Dataset.from_dict(_rows(4)).save_to_disk(str(tmp_path / "texts"))
    output_dir = tmp_path / "out"
    metrics = finetune.main([
        "--model_name_or_path", str(model_dir), "--dataset", str(tmp_path / "texts"), "--quant_type", "nf4",
        "--max_seq_len", "40", "--batch_size", "1", "--accumulate_grad_batches", "2", "--lora_r", "4",
        "--learning_rate", "1e-2", "--warmup_steps", "1", "--checkpointing", "offload",
        "--checkpoint_fraction", "0.5", "--max_steps", "2", "--output_dir", str(output_dir),
    ])  # fmt: skip
    assert math.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0
    lora_b = _lora_b_weights(output_dir)
    assert lora_b and all(weight.abs().max() > 0 for weight in lora_b.values())
    assert not (output_dir / "merged").exists()
