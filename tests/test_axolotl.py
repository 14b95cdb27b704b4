"""The Axolotl plugin (lightning_fastft.integrations.axolotl) with the real axolotl package.

Axolotl's pins clash with the main lock, so these tests run in a venv of their own:
``scripts/test_axolotl.sh`` (called by ``scripts/test.sh``) installs it from
``constraints-axolotl.txt`` and sets ``FASTFT_REQUIRE_AXOLOTL=1``, which turns a missing axolotl
into an import error. In the main venv, without axolotl, only the test of the missing-axolotl
error runs and the others are skipped with that reason.
"""

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import packing_lm

from lightning_fastft.integrations import axolotl as fastft_axolotl

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "axolotl" / "fastft_lora.yml"
PLUGIN = "lightning_fastft.integrations.axolotl.FastFTPlugin"

HAVE_AXOLOTL = importlib.util.find_spec("axolotl") is not None
if os.environ.get("FASTFT_REQUIRE_AXOLOTL") == "1" and not HAVE_AXOLOTL:
    raise ImportError("FASTFT_REQUIRE_AXOLOTL=1 but axolotl is not installed (scripts/test_axolotl.sh installs it)")
needs_axolotl = pytest.mark.skipif(
    not HAVE_AXOLOTL, reason="axolotl is not installed here: scripts/test_axolotl.sh runs these in its own venv"
)


@pytest.mark.skipif(HAVE_AXOLOTL, reason="checks the error raised where axolotl is missing")
def test_plugin_needs_axolotl_args_do_not():
    assert "axolotl" not in sys.modules  # importing the integration did not import it
    args = fastft_axolotl.FastFTArgs(fastft_checkpointing="recompute", fastft_packing=True)
    assert args.fastft_checkpointing == "recompute"
    with pytest.raises(ImportError, match="needs axolotl"):
        fastft_axolotl.FastFTPlugin


def _cfg(**overrides):
    from axolotl.utils.dict import DictDefault

    cfg = dict(
        plugins=[PLUGIN],
        adapter="lora",
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lora_target_linear=True,
        gradient_checkpointing=True,
        sequence_len=64,
        fastft_checkpointing="recompute",
    )
    cfg.update(overrides)
    return DictDefault(cfg)


def _batch(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 97, (2, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids.masked_fill(attention_mask == 0, -100)}


def _randomise_lora_b(model) -> None:
    """LoRA B starts at zero; make it non-zero (same values in both models) so every LoRA weight gets a gradient."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def _forwards(model) -> dict:
    """``{module name: the lightning_fastft function its instance forward runs}``."""
    return {
        name: getattr(module.__dict__.get("forward"), "function", None)
        for name, module in model.named_modules()
        if "forward" in module.__dict__
    }


@needs_axolotl
def test_hooks_in_axolotl_order_give_the_fastft_strategy_model():
    """register, pre_model_load, post_model_build, pre_lora_load, (Axolotl's load_adapter),
    post_lora_load, post_model_load: the model they leave is the one Trainer(strategy=FastFTStrategy)
    trains: the same patches, checkpointed layers, loss and gradients."""
    import lightning.pytorch as pl
    from axolotl.integrations.base import load_plugin
    from axolotl.loaders.adapter import load_adapter
    from helpers import quiet_trainer

    from lightning_fastft import FastFTStrategy
    from lightning_fastft.training.checkpointing import (
        checkpointed_layers,
        hf_gradient_checkpointing_on,
    )

    plugin = load_plugin(PLUGIN)  # how Axolotl loads it: FastFTPlugin built on first access
    assert type(plugin).__name__ == "FastFTPlugin" and plugin.get_input_args().endswith(".FastFTArgs")
    cfg = _cfg()
    with pytest.warns(UserWarning, match="gradient_checkpointing is turned off"):
        plugin.register(cfg)
    assert cfg.gradient_checkpointing is False and cfg.lora_qkv_kernel is False
    plugin.pre_model_load(cfg)
    base = packing_lm("llama")
    reference = copy.deepcopy(base)

    plugin.post_model_build(cfg, base)
    plugin.pre_lora_load(cfg, base)
    torch.manual_seed(3)
    model, _ = load_adapter(base, cfg, cfg.adapter)
    plugin.post_lora_load(cfg, model)
    plugin.post_model_load(cfg, model)
    model.gradient_checkpointing_enable()  # the Trainer's call for gradient_checkpointing: refused (a warning)

    torch.manual_seed(3)
    reference, _ = load_adapter(reference, cfg, cfg.adapter)
    _randomise_lora_b(model)
    _randomise_lora_b(reference)

    class Wrap(pl.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)  # weights stay: only the patching is wanted

    strategy = FastFTStrategy(checkpointing="recompute")
    loader = torch.utils.data.DataLoader([_batch(0)], batch_size=None)
    quiet_trainer("cpu", strategy=strategy, max_steps=1).fit(Wrap(reference), train_dataloaders=loader)

    ours, theirs = plugin.patch_report.models, strategy.patch_report.models
    assert [(m.patched, m.skipped) for m in ours] == [(m.patched, m.skipped) for m in theirs]
    assert ours[0].patched["lora_qkv"] == 2 and ours[0].patched["cross_entropy"] == 1
    assert _forwards(model) == _forwards(reference) and len(_forwards(model)) > 10
    layers, reference_layers = list(model.get_base_model().model.layers), list(reference.get_base_model().model.layers)
    assert checkpointed_layers(model) == layers
    assert checkpointed_layers(reference) == reference_layers
    assert not hf_gradient_checkpointing_on(model)

    for net in (model, reference):
        net.train()
        net.zero_grad()
        net(**_batch(1)).loss.backward()
    torch.testing.assert_close(model(**_batch(2)).loss, reference(**_batch(2)).loss, rtol=0, atol=0)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for name, param in reference.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(grads[name], param.grad, rtol=0, atol=0, msg=name)


@needs_axolotl
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"plugins": [PLUGIN, "axolotl.integrations.liger.LigerPlugin"]}, "LigerPlugin"),
        ({"plugins": [PLUGIN, "cut_cross_entropy.CutCrossEntropyPlugin"], "cut_cross_entropy": True}, "CutCrossEntropy"),
        ({"liger_rms_norm": True}, "liger_rms_norm: true"),
        ({"lora_mlp_kernel": True}, "lora_mlp_kernel: true"),
        ({"fastft_packing": True, "sample_packing": True}, "sample_packing together with fastft_packing"),
        ({"activation_offloading": True}, "activation_offloading together with fastft_checkpointing"),
        ({"fastft_checkpointing": "gpu"}, "checkpointing must be one of"),
        ({"fastft_optimizer": "adamw_8bit", "optimizer": "lion_8bit"}, "optimizer: lion_8bit"),
    ],
)
def test_refused_combinations(overrides, message):
    from axolotl.integrations.base import load_plugin

    plugin = load_plugin(PLUGIN)
    with pytest.raises(ValueError, match=message):
        plugin.register(_cfg(**overrides))
    with pytest.raises(ValueError, match=message):
        plugin.pre_model_load(_cfg(**overrides))


@needs_axolotl
def test_trainer_hooks(tmp_path):
    """get_collator_cls_and_kwargs, create_optimizer / post_trainer_create and
    add_callbacks_post_trainer on a real transformers Trainer, as Axolotl's builder calls them."""
    import bitsandbytes as bnb
    from axolotl.integrations.base import load_plugin
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from lightning_fastft.integrations.hf import FastFTCallback

    plugin = load_plugin(PLUGIN)
    cfg = _cfg(fastft_packing=True, fastft_optimizer="adamw_8bit")
    plugin.register(cfg)
    collator_cls, kwargs = plugin.get_collator_cls_and_kwargs(cfg)
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "examples" / "assets")
    collator = collator_cls(tokenizer, **kwargs, padding=True, pad_to_multiple_of=16, return_tensors="pt")  # as Axolotl builds it
    features = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, 6, 7]},
                {"input_ids": [8, 9], "attention_mask": [1, 1], "labels": [-100, 9]}]  # fmt: skip
    batch = collator(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9] + [tokenizer.pad_token_id] * 11]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 16] and batch["position_ids"][0, :5].tolist() == [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="padding"):
        collator_cls(tokenizer, **kwargs, padding="max_length")

    model = packing_lm("llama")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], weight_decay=0.1, learning_rate=3e-4)
    trainer = Trainer(model=model, args=args)
    plugin.post_trainer_create(cfg, trainer)
    assert isinstance(trainer.optimizer, bnb.optim.AdamW8bit)
    groups = trainer.optimizer.param_groups  # the Trainer's own groups: decayed weights, then the rest
    assert [group["weight_decay"] for group in groups] == [0.1, 0.0] and all(g["lr"] == 3e-4 for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert plugin.create_optimizer(cfg, trainer) is trainer.optimizer
    assert plugin.add_callbacks_post_trainer(cfg, trainer) == []
    assert isinstance(trainer.callback_handler.callbacks[0], FastFTCallback)


def _tiny_run(tmp_path: Path) -> Path:
    """A tiny random Llama with the examples' tokenizer, a local completion data set, and the
    example YAML pointed at them (CPU, fp32, 3 steps)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "examples" / "assets")
    model = packing_lm("llama")
    model.config.update(dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id))  # fmt: skip
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    generator = torch.Generator().manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    with open(tmp_path / "data.jsonl", "w") as data:
        for _ in range(48):
            words = [
                "".join(letters[int(i)] for i in torch.randint(0, 26, (int(torch.randint(2, 7, (1,), generator=generator)),), generator=generator))
                for _ in range(int(torch.randint(2, 7, (1,), generator=generator)))
            ]  # fmt: skip
            data.write('{"text": "%s"}\n' % " ".join(words))
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg.update(
        base_model=str(tmp_path / "model"),
        datasets=[{"path": str(tmp_path / "data.jsonl"), "ds_type": "json", "type": "completion"}],
        dataset_prepared_path=str(tmp_path / "prepared"),
        output_dir=str(tmp_path / "out"),
        sequence_len=64,
        micro_batch_size=2,
        max_steps=3,
        warmup_steps=0,
        logging_steps=1,
        bf16=False,
    )
    path = tmp_path / "axolotl.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@needs_axolotl
@pytest.mark.slow
@pytest.mark.subprocess
def test_axolotl_train_with_the_example_yaml(tmp_path):
    """``axolotl train`` (its CLI, in a fresh process) on the example YAML, pointed at a tiny local
    model: the plugin's kernels, fused LoRA, checkpointing, packing collator and metrics run, and
    the merged export equals the saved adapter merged by PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = _tiny_run(tmp_path)
    # LOG_LEVEL=INFO: Axolotl's logging shows other packages' info messages (the plugin's report)
    env = dict(os.environ, AXOLOTL_DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled", LOG_LEVEL="INFO")
    # without a GPU the kernels then run their PyTorch references (the Triton interpreter, which
    # the kernel tests use, would take minutes here): this test is about the plugin's wiring
    env.pop("TRITON_INTERPRET", None)
    axolotl_cli = Path(sys.executable).with_name("axolotl")
    result = subprocess.run(
        [str(axolotl_cli), "train", str(config), "--launcher", "python"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "Plugin loaded successfully: " + PLUGIN in log
    assert "tokens_per_sec" in log  # FastFTCallback's metrics in the Trainer's logs
    assert "lightning_fastft patching report" in log and "lora_qkv" in log
    assert "lightning_fastft: optimizer AdamW8bit" in log
    assert "lightning_fastft: exported merged" in log

    out = tmp_path / "out"
    exported = AutoModelForCausalLM.from_pretrained(out / "fastft_export", dtype=torch.float32)
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "model"), out)
    merged = trained.merge_and_unload().to(torch.bfloat16).float()  # the export is bf16 (merge_and_save's default)
    lora_moved = False
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], value, rtol=1e-2, atol=1e-3, msg=name)
        lora_moved |= not torch.equal(value, base[name].to(torch.bfloat16).float())
    assert lora_moved  # training changed the merged weights
