"""Fine-tune a Hugging Face causal LM on your data with LoRA / QLoRA and lightning_fastft.

    python examples/finetune.py --model_name_or_path meta-llama/Llama-3.2-1B \\
        --dataset tatsu-lab/alpaca --prompt_column instruction --response_column output \\
        --max_seq_len 2048 --lora_r 16 --quant_type nf4 --checkpointing offload --max_steps 200

``--dataset`` is anything ``datasets.load_dataset`` takes (a hub name, a local directory, or a
``.json``/``.jsonl``/``.csv``/``.parquet`` file). Rows are either one ``--text_column`` (loss on
every token) or a ``--prompt_column`` + ``--response_column`` pair (loss on the response only).
Samples are packed into rows of ``--max_seq_len`` tokens (uncontaminated: each attends only to
itself) and trained through ``Trainer(strategy=FastFTStrategy(...))``. The LoRA adapter and the
tokenizer are saved to ``--output_dir``; with ``--save_merged`` also a plain 16-bit checkpoint with
the adapter merged in (the 4-bit base dequantised) to ``--output_dir/merged``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, get_args

import lightning.pytorch as pl
from torch.utils.data import DataLoader

import lightning_fastft
from lightning_fastft.data import PackedCollator, pack_sequences
from lightning_fastft.module import CausalLMFineTune
from lightning_fastft.patching.options import CHECKPOINTING
from lightning_fastft.qlora import QuantType
from lightning_fastft.strategies import FastFTStrategy


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model_name_or_path", required=True, help="local model directory or hub name")
    parser.add_argument("--dataset", required=True, help="dataset name, directory or data file for load_dataset")
    parser.add_argument("--dataset_config", default=None, help="dataset configuration name")
    parser.add_argument("--split", default="train")
    parser.add_argument("--text_column", default="text", help="used when no --prompt_column is given")
    parser.add_argument("--prompt_column", default=None)
    parser.add_argument("--response_column", default=None)
    parser.add_argument("--max_seq_len", type=int, default=2048, help="tokens per packed row")
    parser.add_argument("--batch_size", type=int, default=2, help="packed rows per step")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--lora_alpha", type=int, default=16)
    parser.add_argument("--quant_type", choices=get_args(QuantType), default=None,
                        help="QLoRA: load the base in 4-bit")  # fmt: skip
    parser.add_argument("--checkpointing", choices=CHECKPOINTING, default=None,
                        help="activation checkpointing of the decoder layers (default: none)")  # fmt: skip
    parser.add_argument("--checkpoint_fraction", type=float, default=1.0,
                        help="share of the decoder layers checkpointed; less recompute, more memory")  # fmt: skip
    parser.add_argument("--memory_budget_gib", type=float, default=None,
                        help="--checkpointing auto: peak GPU memory to fit (default: free memory minus 10%%)")  # fmt: skip
    parser.add_argument("--optimizer", choices=("adamw", "adamw_8bit"), default="adamw")
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--warmup_steps", type=int, default=10)
    parser.add_argument("--max_steps", type=int, default=100)
    parser.add_argument("--accumulate_grad_batches", type=int, default=1)
    parser.add_argument("--output_dir", default="outputs/finetune")
    parser.add_argument("--save_merged", action="store_true", help="also save the merged model to OUTPUT_DIR/merged")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_rows(args: argparse.Namespace):
    """The ``--split`` of ``--dataset``: a data file, a ``save_to_disk`` directory, or anything
    ``datasets.load_dataset`` takes (a hub name, a directory of data files)."""
    import datasets

    path = Path(args.dataset)
    builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
    if path.is_file() and builder is not None:
        return datasets.load_dataset(builder, data_files={args.split: str(path)}, split=args.split)
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        saved = datasets.load_from_disk(str(path))
        return saved[args.split] if isinstance(saved, datasets.DatasetDict) else saved
    return datasets.load_dataset(args.dataset, args.dataset_config, split=args.split)


def check_model_path(name_or_path: str) -> None:
    """Fail naming the path when ``--model_name_or_path`` is neither a local model directory nor a
    hub model name (``from_pretrained`` would complain about a malformed hub repo id)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(name_or_path)
    if path.is_file():
        raise SystemExit(f"--model_name_or_path {name_or_path}: a file, not a model directory")
    if path.is_dir():
        return
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise SystemExit(f"--model_name_or_path {name_or_path}: no such model directory") from None


def tokenize_rows(dataset, tokenizer, args: argparse.Namespace) -> list[dict[str, list[int]]]:
    """Samples for the packing collator: ``input_ids`` ending with EOS, ``loss_mask`` 0 on prompts."""
    if args.prompt_column:
        wanted = {"--prompt_column": args.prompt_column, "--response_column": args.response_column}
    else:
        wanted = {"--text_column": args.text_column}
    missing = [f"{flag} {column!r}" for flag, column in wanted.items() if column not in dataset.column_names]
    if missing:
        raise SystemExit(
            f"dataset {args.dataset} (split {args.split!r}) has no column {', '.join(missing)}; "
            f"its columns are {dataset.column_names}"
        )
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    samples = []
    for row in dataset:
        if args.prompt_column:
            prompt = tokenizer(row[args.prompt_column])["input_ids"]
            response = tokenizer(row[args.response_column], add_special_tokens=False)["input_ids"] + eos
            samples.append({"input_ids": prompt + response, "loss_mask": [0] * len(prompt) + [1] * len(response)})
        else:
            input_ids = tokenizer(row[args.text_column])["input_ids"] + eos
            samples.append({"input_ids": input_ids, "loss_mask": [1] * len(input_ids)})
    return samples


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.prompt_column and not args.response_column:
        raise SystemExit("--prompt_column needs --response_column")
    if args.response_column and not args.prompt_column:
        raise SystemExit("--response_column needs --prompt_column")
    check_model_path(args.model_name_or_path)
    from transformers import AutoTokenizer

    pl.seed_everything(args.seed, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    samples = tokenize_rows(load_rows(args), tokenizer, args)

    module = CausalLMFineTune(
        model=args.model_name_or_path,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        quant_type=args.quant_type,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
    )

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    rows = pack_sequences(samples, args.max_seq_len)
    print(f"{len(samples)} samples packed into {len(rows)} rows of at most {args.max_seq_len} tokens")
    loader = DataLoader(rows, batch_size=args.batch_size, shuffle=True, collate_fn=PackedCollator(pad_token_id=pad_id))
    strategy = FastFTStrategy(
        checkpointing=args.checkpointing,
        checkpoint_fraction=args.checkpoint_fraction,
        memory_budget_gib=args.memory_budget_gib,
        optimizer="adamw_8bit" if args.optimizer == "adamw_8bit" else None,
    )
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="auto",
        devices=1,
        precision="bf16-true",
        max_steps=args.max_steps,
        accumulate_grad_batches=args.accumulate_grad_batches,
        callbacks=[lightning_fastft.FastFTMetrics()],
        logger=False,
        enable_checkpointing=False,
        log_every_n_steps=10,
    )
    trainer.fit(module, loader)
    print(strategy.patch_report)
    module.model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"LoRA adapter and tokenizer saved to {args.output_dir}")
    if args.save_merged:
        from lightning_fastft.export import merge_and_save

        merge_and_save(module.model, Path(args.output_dir) / "merged", tokenizer=tokenizer)
        print(f"merged model saved to {Path(args.output_dir) / 'merged'}")
    return {key: float(value) for key, value in trainer.callback_metrics.items()}


if __name__ == "__main__":
    main()
