"""lightning_fastft with a plain Hugging Face ``Trainer`` (the same two lines work for TRL's ``SFTTrainer``).

    python examples/hf_trainer.py --model Qwen/Qwen2.5-0.5B --lora

Trains on a few synthetic sequences; swap in your own dataset and collator.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from lightning_fastft.integrations.hf import FastFTCallback, prepare_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--checkpointing", choices=["recompute", "offload"], default=None)
    parser.add_argument("--steps", type=int, default=20)
    options = parser.parse_args()

    model = AutoModelForCausalLM.from_pretrained(options.model, dtype=torch.bfloat16)
    if options.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model = prepare_model(model, checkpointing=options.checkpointing)  # 1: patch the model
    print(model.fastft_patch_report)

    vocab = model.config.get_text_config().vocab_size
    dataset = [{"input_ids": torch.randint(0, vocab, (int(n),))} for n in torch.randint(64, 512, (64,))]

    def collate(samples):
        longest = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.zeros(len(samples), longest, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, sample in enumerate(samples):
            input_ids[row, : len(sample["input_ids"])] = sample["input_ids"]
            attention_mask[row, : len(sample["input_ids"])] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "labels": input_ids.masked_fill(attention_mask == 0, -100)}  # fmt: skip

    args = TrainingArguments(
        output_dir="hf_trainer_out",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=options.steps,
        logging_steps=5,
        bf16=torch.cuda.is_available(),
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate)
    FastFTCallback().attach(trainer)  # 2: logs tokens_per_sec, mfu and peak_mem_gib, ahead of the reporters
    trainer.train()


if __name__ == "__main__":
    main()
