"""Training with ``strategy="fastft"`` follows plain Lightning + HF step for step (fp32, and bf16 on a GPU).

For each supported architecture a tiny random-weight model (``tiny_models.CONVERGENCE``) trains 20
steps from the same seed with and without the fastft strategy (every patch on); the loss of every
step, the final logits and the trained weights must agree. On a GPU the same runs in bf16-true must
give the same loss per step within bf16's precision. A 2-process DDP run (gloo, CPU) with
``fastft_ddp`` must match the single-process run on the same global batch: run it alone with
``-m ddp``, leave it out with ``-m "not ddp"`` (the default run includes it).
"""

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import RecordLosses, quiet_trainer
from tiny_models import CONVERGENCE, CONVERGENCE_VOCAB
from torch.utils.data import DataLoader

from lightning_fastft.module import CausalLMFineTune, SyntheticCausalLMDataModule

VOCAB = CONVERGENCE_VOCAB
STEPS = 20
LEARNING_RATE = 1e-3
"""Plain HF training from initial weights perturbed by 1e-7 (relative, i.e. fp32 rounding) ends, after
STEPS AdamW steps, this far from the unperturbed run (max |weight difference|, measured on CPU):
at lr 5e-3 up to 1.4e-4 (full fine-tuning of qwen2), above the 1e-4 tolerance, so the weight
comparison would test the amplification of rounding; at 1e-3: qwen2 3.1e-5, gemma2 6.9e-6, llama
6e-8, within it."""


def probe_batch():
    generator = torch.Generator().manual_seed(99)
    return torch.randint(1, VOCAB, (2, 7), generator=generator)


def run_fit(
    config, lora_r, strategy, steps, device, devices=1, batch_size=1, num_samples=None, sampler=None,
    precision="32-true",
):  # fmt: skip
    """Fit from seed 0; returns (loss per step, logits on ``probe_batch()``, trainable weights).

    Runs on ``devices`` x ``device`` at Lightning's ``precision``;
    ``sampler`` (an index order) replaces the data module's sequential order.
    """
    pl.seed_everything(0)
    module = CausalLMFineTune(
        model=config, lora_r=lora_r, lora_alpha=2 * max(lora_r, 1), learning_rate=LEARNING_RATE, init_seed=0
    )
    data = SyntheticCausalLMDataModule(
        vocab_size=VOCAB, seq_len=8, batch_size=batch_size, num_samples=num_samples or batch_size * steps, seed=1
    )
    losses = RecordLosses()
    trainer = quiet_trainer(
        device, devices=devices, strategy=strategy, precision=precision, max_steps=steps, callbacks=[losses]
    )
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


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(CONVERGENCE))
def test_fastft_matches_plain_training(device, arch):
    config, lora_r = CONVERGENCE[arch]
    fast = run_fit(config, lora_r, "fastft", STEPS, device)
    reference = run_fit(config, lora_r, "auto", STEPS, device)
    _assert_same_run(fast, reference)


# bf16 (10 steps, losses per step at rtol 2e-2). bf16 keeps 8 significant bits: one rounding is off
# by up to 2**-8 (about 4e-3) relative, and the kernels round at other points than HF's modules
# (fused ops, fp32 accumulation inside a kernel), so two correct runs differ by a few roundings from
# the first forward on. A step's loss, a mean of fp32 cross-entropies over its tokens, averages that
# noise: on CPU (bf16-true, kernels in the Triton interpreter) all six architectures stay within
# 2e-3 of each other for 10 steps. rtol 2e-2 (about 5 units of 2**-8) keeps a 10x margin and still
# fails a bf16 path that computes something else (a wrong cast, an overflow, a kernel that lost its
# fp32 accumulation). Weights and logits are not compared, nor more steps run: with bf16 weights,
# AdamW turns rounding noise in gradients that are exactly 0 in exact arithmetic (k_proj biases:
# softmax ignores a per-row shift) into lr-sized steps of random sign, and the runs drift apart (on
# CPU: 1.3e-2 loss difference by step 18 of full fine-tuning, O(1) probe-logit difference after 10
# Qwen2 steps).
BF16_STEPS = 10


@pytest.mark.slow
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="bf16 training of the Triton kernels needs a GPU (the fp32 test runs on CPU)"
)
@pytest.mark.parametrize("arch", list(CONVERGENCE))
def test_fastft_matches_plain_training_bf16(device, arch):
    config, lora_r = CONVERGENCE[arch]
    fast_losses, _, fast_weights = run_fit(config, lora_r, "fastft", BF16_STEPS, device, precision="bf16-true")
    ref_losses, _, ref_weights = run_fit(config, lora_r, "auto", BF16_STEPS, device, precision="bf16-true")
    assert {w.dtype for w in fast_weights.values()} == {w.dtype for w in ref_weights.values()} == {torch.bfloat16}
    assert len(fast_losses) == len(ref_losses) == BF16_STEPS
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(ref_losses), rtol=2e-2, atol=0)


DDP_SCRIPT = """
import os, sys
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, {tests!r})
import torch
import lightning_fastft
from test_convergence import run_fit
from tiny_models import CONVERGENCE

config, lora_r = CONVERGENCE["llama"]
result = run_fit(
    config, lora_r, "fastft_ddp", {steps}, "cpu", devices=2, batch_size=1, num_samples=2 * {steps}
)
if int(os.environ.get("LOCAL_RANK", "0")) == 0:
    torch.save(result, {out!r})
"""


@pytest.mark.ddp
@pytest.mark.subprocess
@pytest.mark.slow
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

    config, lora_r = CONVERGENCE["llama"]
    order = torch.randperm(2 * steps, generator=torch.Generator().manual_seed(0)).tolist()
    _, logits, weights = run_fit(
        config, lora_r, "fastft", steps, "cpu", batch_size=2, num_samples=2 * steps, sampler=order
    )
    torch.testing.assert_close(ddp_logits, logits, rtol=1e-4, atol=1e-4)
    for name, weight in weights.items():
        torch.testing.assert_close(ddp_weights[name], weight, rtol=1e-4, atol=1e-4, msg=name)
