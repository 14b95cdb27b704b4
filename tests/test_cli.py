"""The lightning-fastft CLI runs both example configs (string and class forms of the strategy)."""

import csv
from pathlib import Path

import pytest
import torch

from lightning_fastft.cli import build_cli
from lightning_fastft.strategies import FastFTStrategy

CONFIGS = Path(__file__).parent.parent / "examples" / "configs"


@pytest.mark.parametrize("config", ["tiny_llama_lora.yaml", "tiny_qwen2_full_8bit.yaml"])
def test_cli_fit_with_example_config(device, tmp_path, config):
    args = [
        "fit",
        f"--config={CONFIGS / config}",
        "--trainer.max_steps=2",
        "--trainer.accumulate_grad_batches=1",
        f"--trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=0",
        "--data.init_args.seq_len=8",
        "--data.init_args.batch_size=2",
    ]
    cli = build_cli(args)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, FastFTStrategy)
    assert strategy.patch_report.models[0].patched["rms_norm"] > 0
    assert cli.trainer.global_step == 2
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert sum(bool(r.get("train_loss")) for r in rows) == 2
    throughputs = [float(r["tokens_per_sec"]) for r in rows if r.get("tokens_per_sec")]
    assert throughputs and all(tokens_per_sec > 0 for tokens_per_sec in throughputs)
    if config == "tiny_qwen2_full_8bit.yaml":
        import bitsandbytes as bnb

        assert strategy.patch_options.checkpointing == "recompute"
        assert isinstance(cli.trainer.optimizers[0], bnb.optim.AdamW8bit)
    else:
        assert cli.model.model.peft_config["default"].r == 8


def test_cli_help_lists_the_fastft_strategy_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--help"])
    assert exit_info.value.code == 0
    usage = " ".join(capsys.readouterr().out.split())
    assert "--trainer.strategy.NAME VALUE" in usage
    for option in (
        "checkpointing: Optional[Literal['recompute', 'offload', 'auto']] = None",
        "memory_budget_gib: Optional[float] = None",
        "token_exact: bool = True",
    ):
        assert option in usage


def test_cli_strategy_name_in_yaml_takes_options_from_the_command_line():
    args = [
        f"--config={CONFIGS / 'tiny_llama_lora.yaml'}",
        "--trainer.strategy.checkpointing",
        "offload",
        "--trainer.strategy.token_exact=false",
    ]
    strategy = build_cli(args, run=False).trainer.strategy
    assert isinstance(strategy, FastFTStrategy)
    assert strategy.patch_options.checkpointing == "offload" and strategy.token_exact is False
    with pytest.raises(SystemExit):
        build_cli([*args, "--trainer.strategy.fused_lora=maybe"], run=False)


def test_cli_predict_generates_token_ids(device, tmp_path):
    args = [
        "predict",
        f"--config={CONFIGS / 'tiny_llama_lora.yaml'}",
        "--model.max_new_tokens=3",
        f"--trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_predict_batches=1",
        "--data.init_args.seq_len=8",
        "--data.init_args.batch_size=2",
    ]
    cli = build_cli(args)
    # "1" may parse as the float 1.0 (100% of the batches) under another Lightning/jsonargparse
    # (seen on the GPU image): every predicted batch is checked, however many ran
    predictions = cli.trainer.predict_loop.predictions
    assert predictions and all(g.shape == (2, 3) and g.dtype == torch.long for g in predictions)
