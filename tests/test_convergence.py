"""Training with ``strategy="fastft"`` follows plain Lightning + HF step for step (fp32).

For each supported architecture a tiny random-weight model trains 20 steps from the same seed
with and without the fastft strategy (every patch on); the loss of every step, the final logits
and the trained weights must agree. A 2-process DDP run (gloo, CPU) with ``fastft_ddp`` must
match the single-process run on the same global batch: run it alone with ``-m ddp``.
"""

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import RecordLosses, quiet_trainer
from torch.utils.data import DataLoader

from lightning_fastft.module import CausalLMFineTune, SyntheticCausalLMDataModule

VOCAB = 128
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
# (config fields, LoRA rank: 0 = full fine-tuning)
ARCHITECTURES = {
    "llama": (dict(model_type="llama", **BASE), 4),
    "mistral": (dict(model_type="mistral", sliding_window=None, **BASE), 0),
    "qwen2": (dict(model_type="qwen2", **BASE), 0),
    "qwen3": (dict(model_type="qwen3", head_dim=16, **BASE), 4),
    "gemma": (dict(model_type="gemma", head_dim=16, hidden_act="gelu_pytorch_tanh", **BASE), 0),
    "gemma2": (dict(model_type="gemma2", head_dim=16, query_pre_attn_scalar=16, sliding_window=8, **BASE), 4),
}
STEPS = 20


def probe_batch():
    generator = torch.Generator().manual_seed(99)
    return torch.randint(1, VOCAB, (2, 7), generator=generator)


def run_fit(config, lora_r, strategy, steps, device, devices=1, batch_size=1, num_samples=None, sampler=None):
    """Fit from seed 0; returns (loss per step, logits on ``probe_batch()``, trainable weights).

    Runs on ``devices`` x ``device``; ``sampler`` (an index order) replaces the data module's sequential order.
    """
    pl.seed_everything(0)
    module = CausalLMFineTune(
        model=config, lora_r=lora_r, lora_alpha=2 * max(lora_r, 1), learning_rate=5e-3, init_seed=0
    )
    data = SyntheticCausalLMDataModule(
        vocab_size=VOCAB, seq_len=8, batch_size=batch_size, num_samples=num_samples or batch_size * steps, seed=1
    )
    losses = RecordLosses()
    trainer = quiet_trainer(device, devices=devices, strategy=strategy, max_steps=steps, callbacks=[losses])
    if sampler is None:
        trainer.fit(module, data)
    else:
        trainer.fit(module, DataLoader(data.train_set, batch_size=batch_size, sampler=sampler))
    module.eval()
    with torch.no_grad():
        logits = module(input_ids=probe_batch().to(module.device)).logits.cpu()
    weights = {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}
    return losses.losses, logits, weights


def _assert_same_run(fast, reference, rtol=1e-4, atol=1e-4):
    fast_losses, fast_logits, fast_weights = fast
    ref_losses, ref_logits, ref_weights = reference
    assert len(fast_losses) == len(ref_losses)
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(ref_losses), rtol=rtol, atol=atol)
    torch.testing.assert_close(fast_logits, ref_logits, rtol=rtol, atol=atol)
    assert fast_weights.keys() == ref_weights.keys()
    for name, weight in fast_weights.items():
        torch.testing.assert_close(weight, ref_weights[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_fastft_matches_plain_training(device, arch):
    config, lora_r = ARCHITECTURES[arch]
    fast = run_fit(config, lora_r, "fastft", STEPS, device)
    reference = run_fit(config, lora_r, "auto", STEPS, device)
    _assert_same_run(fast, reference)


DDP_SCRIPT = """
import os, sys
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, {tests!r})
import torch
import lightning_fastft
from test_convergence import ARCHITECTURES, run_fit

config, lora_r = ARCHITECTURES["llama"]
result = run_fit(
    config, lora_r, "fastft_ddp", {steps}, "cpu", devices=2, batch_size=1, num_samples=2 * {steps}
)
if int(os.environ.get("LOCAL_RANK", "0")) == 0:
    torch.save(result, {out!r})
"""


@pytest.mark.ddp
def test_fastft_ddp_matches_single_process(tmp_path):
    """2 ranks x 1 row per step == 1 process x 2 rows (token-exact across ranks, unequal row lengths).

    Lightning's DistributedSampler shuffles (seed 0, epoch 0) and deals indices round-robin; the
    single process reads the same permutation two rows at a time.
    """
    steps = 4
    script = tmp_path / "ddp_fit.py"
    out = tmp_path / "ddp_result.pt"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), steps=steps, out=str(out)))
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    completed = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    _, ddp_logits, ddp_weights = torch.load(out, weights_only=False)

    config, lora_r = ARCHITECTURES["llama"]
    order = torch.randperm(2 * steps, generator=torch.Generator().manual_seed(0)).tolist()
    _, logits, weights = run_fit(
        config, lora_r, "fastft", steps, "cpu", batch_size=2, num_samples=2 * steps, sampler=order
    )
    torch.testing.assert_close(ddp_logits, logits, rtol=1e-4, atol=1e-4)
    for name, weight in weights.items():
        torch.testing.assert_close(ddp_weights[name], weight, rtol=1e-4, atol=1e-4, msg=name)
