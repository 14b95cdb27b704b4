"""GRPOFineTune: rewards and advantages, rollouts, exact micro-batching, memory across micro-batches,
a 20-step run against an unfused reference, bad inputs, QLoRA, DDP and the CLI config."""

import math
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer
from test_rl import reference_grpo
from tiny_models import CONVERGENCE

import lightning_fastft  # noqa: F401  (registers the fastft strategies)
from lightning_fastft.rl import GRPOFineTune, PromptDataModule, group_advantages, reference_match, score_completions
from lightning_fastft.rl.rewards import nanstd, weighted_rewards

ROOT = Path(__file__).parents[1]
TOKENIZER = str(ROOT / "examples" / "assets")  # the demo's word-level tokenizer (32 tokens)
WORDS = ["abc", "hello", "xyz", "light", "moe", "qwen", "kernels", "zz"]


def grpo_config(arch: str = "llama") -> dict:
    config, _ = CONVERGENCE[arch]
    return {**config, "vocab_size": 32}


def prompt_rows(words=WORDS):
    return [{"prompt": f"<bos>reverse: {w} answer:", "answer": w[::-1]} for w in words]


def letters_reward(prompts, completions, **_):
    """Dense: the share of letters (no specials) in each completion."""
    return [sum(c.isalpha() for c in text) / max(len(text), 1) for text in completions]


def make_module(arch: str = "llama", **overrides) -> GRPOFineTune:
    settings = dict(
        model=grpo_config(arch), tokenizer=TOKENIZER, reward_funcs=[reference_match, letters_reward],
        num_generations=3, max_completion_length=6, lora_r=4, lora_alpha=8, learning_rate=5e-3, init_seed=0,
    )
    settings.update(overrides)
    module = GRPOFineTune(**settings)
    module.configure_model()
    return module


# ----------------------------------------------------------------------------- rewards and advantages


def trl_advantages(rewards_per_function, weights, num_generations, scale_rewards):
    """TRL's sum_then_normalize advantages, transcribed (nanstd is TRL's own)."""
    from trl.trainer.utils import nanstd as trl_nanstd

    rewards = (rewards_per_function * weights.unsqueeze(0)).nansum(dim=1)
    rewards[torch.isnan(rewards_per_function).all(dim=1)] = torch.nan
    mean = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = trl_nanstd(rewards).expand_as(rewards)
    else:
        std = trl_nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return advantages


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_match_trl(scale_rewards):
    rewards = torch.randn(12, 3)
    rewards[2, 1] = math.nan  # a function that does not apply to one completion
    weights = torch.tensor([1.0, 0.5, -2.0])
    advantages = group_advantages(weighted_rewards(rewards, weights), 4, scale_rewards)
    torch.testing.assert_close(advantages, trl_advantages(rewards, weights, 4, scale_rewards))


def test_unscored_completion_gets_zero_advantage():
    rewards = torch.tensor([[1.0], [math.nan], [3.0], [0.0]])
    advantages = group_advantages(weighted_rewards(rewards, torch.ones(1)), 2, "group")
    assert advantages[1] == 0 and not torch.isnan(advantages).any()
    assert advantages[0] == 0  # alone in its group once the None is left out
    torch.testing.assert_close(nanstd(torch.tensor([1.0, math.nan, 3.0])), torch.tensor(2.0**0.5))


def test_reward_function_errors_name_the_function():
    def short(prompts, completions, **_):
        return [1.0]

    def nan_reward(prompts, completions, **_):
        return [math.nan for _ in completions]

    def text_reward(prompts, completions, **_):
        return ["good" for _ in completions]

    def nothing(prompts, completions, **_):
        return None

    for function, message in ((short, "returned 1 rewards for 2"), (nan_reward, "must be finite"),
                              (text_reward, "returned 'good'"), (nothing, "must return a list")):
        with pytest.raises(ValueError, match=f"{function.__name__}.*{message}|{message}.*{function.__name__}"):
            score_completions([function], ["p", "p"], ["a", "b"], {})


def test_reference_match_ranks_exact_answers_first():
    scores = reference_match(["p"] * 4, ["cba", " cba ", "cbx", "cbaaaa"], answer=["cba"] * 4)
    assert scores[0] == scores[1] == 1.0
    assert 0 < scores[2] < 1 and scores[3] < scores[2]


# ----------------------------------------------------------------------------- construction and bad inputs


def test_bad_settings_raise():
    base = dict(model=grpo_config(), tokenizer=TOKENIZER, reward_funcs=[reference_match])
    with pytest.raises(ValueError, match="num_generations must be at least 2"):
        GRPOFineTune(**base, num_generations=1)
    with pytest.raises(ValueError, match="at least one reward function"):
        GRPOFineTune(**{**base, "reward_funcs": []})
    with pytest.raises(ValueError, match="2 reward_weights for 1"):
        GRPOFineTune(**base, reward_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="needs lora_r > 0"):
        GRPOFineTune(**base, beta=0.1, lora_r=0)
    with pytest.raises(ValueError, match="loss_type"):
        GRPOFineTune(**base, loss_type="ppo")
    with pytest.raises(ValueError, match="scale_rewards"):
        GRPOFineTune(**base, scale_rewards="mean")
    with pytest.raises(ValueError, match="cannot import reward function"):
        GRPOFineTune(**{**base, "reward_funcs": ["lightning_fastft.rl.rewards.no_such_reward"]})
    module = GRPOFineTune(**{**base, "reward_funcs": ["lightning_fastft.rl.rewards.reference_match"]})
    assert module.reward_funcs == [reference_match] and module.hparams.reward_funcs == [
        "lightning_fastft.rl.rewards.reference_match"
    ]


def test_bad_batches_raise():
    module = make_module()
    with pytest.raises(ValueError, match="'prompt' list"):
        module.training_step({"text": ["a"]}, 0)


# ----------------------------------------------------------------------------- rollouts and log-probs


def test_rollout_masks_end_at_the_first_eos():
    module = make_module(max_completion_length=8)
    eos = module.tokenizer.eos_token_id
    rollout = module.generate_completions([row["prompt"] for row in prompt_rows()[:3] for _ in range(3)])
    ids, mask = rollout["completion_ids"], rollout["completion_mask"]
    for row_ids, row_mask, truncated, text in zip(ids, mask, rollout["truncated"], rollout["completions"]):
        n = int(row_mask.sum())
        assert row_mask[:n].all() and not row_mask[n:].any()
        eos_at = (row_ids == eos).nonzero()
        assert bool(truncated) == (len(eos_at) == 0)
        if not truncated:
            assert int(eos_at[0]) == n - 1  # the EOS itself is trained on
        assert text == module.tokenizer.decode(row_ids[:n].tolist(), skip_special_tokens=True)
    # prompts are left-padded; positions count real tokens (what generate used)
    attention = rollout["attention_mask"]
    torch.testing.assert_close(rollout["position_ids"][attention.bool()],
                               (attention.cumsum(-1) - 1)[attention.bool()])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_completion_logps_equal_the_models_log_softmax(arch):
    from lightning_fastft.patching import patch_model

    module = make_module(arch, temperature=0.7)
    for param in module.model.parameters():
        if param.requires_grad:
            param.data.normal_(0, 0.1)  # LoRA B is 0 at init: make the adapter matter
    rollout = module.generate_completions([row["prompt"] for row in prompt_rows()[:4] for _ in range(3)])
    with torch.no_grad():
        logits = module.model(input_ids=rollout["input_ids"], attention_mask=rollout["attention_mask"],
                              position_ids=rollout["position_ids"]).logits
    width = rollout["prompt_width"]
    expected = torch.log_softmax(logits[:, width - 1 : -1].double() / 0.7, -1)
    expected = expected.gather(-1, rollout["completion_ids"].unsqueeze(-1)).squeeze(-1)
    patch_model(module)
    module.hparams.micro_batch_size = 5  # chunks of rows that do not divide the batch
    mask = rollout["completion_mask"].bool()
    torch.testing.assert_close(module.completion_logps(rollout)[mask].double(), expected[mask], rtol=0, atol=2e-5)
    with module.model.disable_adapter():
        base = module.model(input_ids=rollout["input_ids"], attention_mask=rollout["attention_mask"],
                            position_ids=rollout["position_ids"]).logits
        ref = module.completion_logps(rollout)
    base = torch.log_softmax(base[:, width - 1 : -1].double() / 0.7, -1)
    base = base.gather(-1, rollout["completion_ids"].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ref[mask].double(), base[mask], rtol=0, atol=2e-5)
    assert (ref[mask] - expected[mask].float()).abs().max() > 1e-3  # the reference is not the policy


# ----------------------------------------------------------------------------- exact micro-batching


def fixed_rollout(module, words=WORDS[:4]):
    torch.manual_seed(1)
    rollout = module.generate_completions([f"<bos>reverse: {w} answer:" for w in words for _ in range(3)])
    advantages = torch.randn(rollout["completion_ids"].shape[0])
    return rollout, advantages


class _StubTrainer:
    world_size = 1

    class strategy:  # noqa: N801  (the attribute the module reads)
        pass


def step_gradients(module, rollout, advantages, micro_batch_size, old=None, ref=None):
    module.hparams.micro_batch_size = micro_batch_size
    module.zero_grad(set_to_none=True)
    module.manual_backward = lambda loss: loss.backward()
    module._trainer = _StubTrainer()
    tokens = rollout["completion_mask"].sum().float()
    metrics = module._accumulate_gradients(rollout, advantages, old, ref, tokens)
    module._trainer = None
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}, metrics


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
def test_micro_batches_give_the_gradient_of_one_batch(loss_type):
    module = make_module(loss_type=loss_type, beta=0.05, num_iterations=2)
    for param in module.model.parameters():
        if param.requires_grad:
            param.data.normal_(0, 0.1)
    rollout, advantages = fixed_rollout(module)
    old = module.completion_logps(rollout) + 0.2 * torch.randn(rollout["completion_ids"].shape)
    with module.model.disable_adapter():
        ref = module.completion_logps(rollout)
    whole, whole_metrics = step_gradients(module, rollout, advantages, None, old, ref)
    parts, parts_metrics = step_gradients(module, rollout, advantages, 5, old, ref)
    for name, grad in whole.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(parts[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for name, value in whole_metrics.items():
        torch.testing.assert_close(parts_metrics[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_micro_batch_hidden_states_are_freed_before_the_next(monkeypatch):
    """With offload checkpointing, each micro-batch's hidden states die before the next micro-batch runs
    (nothing accumulates across chunks), and the gradients equal those without checkpointing."""
    from lightning_fastft.training import checkpointing
    from lightning_fastft.training.checkpointing import apply_activation_checkpointing

    module = make_module()
    for param in module.model.parameters():
        if param.requires_grad:
            param.data.normal_(0, 0.1)
    rollout, advantages = fixed_rollout(module)
    plain, _ = step_gradients(module, rollout, advantages, 4)

    apply_activation_checkpointing(module, checkpointing="offload")
    alive_at_next_chunk = []
    previous: list[weakref.ref] = []
    original = type(module).completion_hidden

    def tracked(self, rollout, rows):
        alive_at_next_chunk.extend(ref() is not None for ref in previous)
        hidden = original(self, rollout, rows)
        previous[:] = [weakref.ref(hidden)]
        return hidden

    monkeypatch.setattr(type(module), "completion_hidden", tracked)
    monkeypatch.setattr(checkpointing, "_warned_cpu_fallback", False)  # warned once per process
    with pytest.warns(UserWarning, match="offload"):  # no CUDA: offload runs as recompute
        offloaded, _ = step_gradients(module, rollout, advantages, 4)
    assert len(alive_at_next_chunk) == 2 and not any(alive_at_next_chunk)
    for name, grad in plain.items():
        torch.testing.assert_close(offloaded[name], grad, rtol=1e-5, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------- training runs


class FullLogitsGRPO(GRPOFineTune):
    """The unfused reference: TRL's loss written on the model's full (materialised) logits."""

    def _accumulate_gradients(self, rollout, advantages, old_logps, ref_logps, global_tokens):
        loss_fn, width = self.grpo_loss, rollout["prompt_width"]
        logits = self.model(input_ids=rollout["input_ids"], attention_mask=rollout["attention_mask"],
                            position_ids=rollout["position_ids"]).logits[:, width - 1 : -1]
        eye = torch.eye(logits.shape[-1], dtype=logits.dtype)  # hidden @ I^T = the logits themselves
        loss, _ = reference_grpo(
            logits, eye, rollout["completion_ids"], rollout["completion_mask"], advantages, old_logps, ref_logps,
            beta=loss_fn.beta, eps_low=loss_fn.epsilon_low, eps_high=loss_fn.epsilon_high, loss_type=loss_fn.loss_type,
            level=loss_fn.importance_sampling_level, temperature=loss_fn.temperature,
            max_completion_length=loss_fn.max_completion_length,
        )
        self.manual_backward(loss.float())
        return {"loss": loss.detach().float()}


def run_grpo(module_class, strategy, steps, arch="llama", devices=1, **overrides):
    torch.manual_seed(0)
    settings = dict(
        model=grpo_config(arch), tokenizer=TOKENIZER, reward_funcs=[reference_match, letters_reward],
        num_generations=3, max_completion_length=6, lora_r=4, lora_alpha=8, learning_rate=2e-2, init_seed=0,
        temperature=0.9,
    )
    module = module_class(**{**settings, **overrides})
    data = PromptDataModule(dataset=prompt_rows() * steps, batch_size=2, shuffle=False)
    trainer = quiet_trainer("cpu", strategy=strategy, max_steps=steps * overrides.get("num_iterations", 1),
                            log_every_n_steps=1, callbacks=[], devices=devices)
    rewards = []

    class Rewards(lightning_fastft.FastFTMetrics):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            rewards.append(float(trainer.callback_metrics["reward"]))

    trainer.callbacks.append(Rewards())
    trainer.fit(module, data)
    weights = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    return weights, rewards, trainer


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_twenty_grpo_steps_match_the_unfused_reference(arch):
    """20 optimizer steps (10 batches x 2 iterations, off-policy, KL to the adapter-free reference):
    the fused, patched run and the materialised-logits HF run sample the same completions and end
    with the same LoRA weights (fp32, 1e-4)."""
    options = dict(beta=0.04, num_iterations=2, micro_batch_size=4, loss_type="grpo", arch=arch, learning_rate=1e-3)
    fused, fused_rewards, trainer = run_grpo(GRPOFineTune, "fastft", 10, **options)
    patched = trainer.strategy.patch_report.models[0].patched
    assert patched["rms_norm"] and patched["lora_qkv"]  # the fused kernels ran (Triton interpreter on CPU)
    reference, reference_rewards, _ = run_grpo(FullLogitsGRPO, "auto", 10, **options)
    assert fused_rewards == pytest.approx(reference_rewards, abs=1e-6)  # the same samples all along
    for name, weight in reference.items():
        assert not torch.equal(weight, torch.zeros_like(weight)) or "lora_B" not in name
        torch.testing.assert_close(fused[name], weight, rtol=1e-4, atol=1e-4, msg=name)


def test_all_masked_batch_is_skipped_with_a_warning(monkeypatch):
    module = make_module(mask_truncated_completions=True, max_completion_length=1)
    original = GRPOFineTune.generate_completions

    def never_ending(self, prompts):
        rollout = original(self, prompts)
        rollout["completion_mask"] = torch.zeros_like(rollout["completion_mask"])
        return rollout

    monkeypatch.setattr(GRPOFineTune, "generate_completions", never_ending)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer = quiet_trainer("cpu", strategy="fastft", max_epochs=1, limit_train_batches=2)
    with pytest.warns(UserWarning, match="every completion of this batch is masked out"):
        trainer.fit(module, PromptDataModule(dataset=prompt_rows(), batch_size=2))
    for name, param in module.named_parameters():
        if param.requires_grad:
            assert torch.equal(param.detach(), before[name]), name


def test_reward_function_of_the_wrong_length_stops_training():
    def broken(prompts, completions, **_):
        return [0.0] * (len(completions) - 1)

    module = make_module(reward_funcs=[broken])
    trainer = quiet_trainer("cpu", strategy="fastft", max_steps=1)
    with pytest.raises(ValueError, match="reward function 'broken' returned 5 rewards for 6 completions"):
        trainer.fit(module, PromptDataModule(dataset=prompt_rows(), batch_size=2))


def test_qlora_grpo_steps():
    """QLoRA: the 4-bit base's GRPO steps train the adapter (bitsandbytes' CPU backend)."""
    weights, rewards, trainer = run_grpo(GRPOFineTune, "fastft", 2, quant_type="nf4", beta=0.04)
    assert len(rewards) == 2 and all(math.isfinite(r) for r in rewards)
    assert any(w.abs().max() > 0 for n, w in weights.items() if "lora_B" in n)
    assert trainer.callback_metrics["tokens_per_sec"] > 0


DDP_SCRIPT = """
import os, sys
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, {tests!r})
import torch
from test_rl_module import run_grpo
from lightning_fastft.rl import GRPOFineTune
weights, rewards, trainer = run_grpo(GRPOFineTune, "fastft_ddp", 3, devices=2, loss_type="dapo",
                                     micro_batch_size=2, scale_rewards="batch")
torch.save((weights, rewards), {out!r} + str(trainer.global_rank))
trainer.strategy.barrier()  # rank 0 (the test's process) returns only once every rank has saved
"""


@pytest.mark.ddp
@pytest.mark.subprocess
@pytest.mark.slow
def test_grpo_under_fastft_ddp(tmp_path):
    """Two gloo ranks sample their own completions, synchronise gradients (last micro-batch only) and
    end with identical adapters."""
    script = tmp_path / "ddp_grpo.py"
    out = tmp_path / "result.pt"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out)))
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    completed = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    (w0, r0), (w1, r1) = (torch.load(f"{out}{rank}", weights_only=False) for rank in (0, 1))
    assert len(r0) == len(r1) == 3
    assert r0 != r1  # each rank scored its own prompts
    for name, weight in w0.items():
        torch.testing.assert_close(w1[name], weight, rtol=0, atol=0, msg=name)
    assert any(w.abs().max() > 0 for n, w in w0.items() if "lora_B" in n)


@pytest.mark.slow
def test_cli_config_runs(tmp_path):
    from lightning_fastft.cli import build_cli

    config = ROOT / "examples" / "configs" / "tiny_llama_grpo.yaml"
    cli = build_cli(
        ["fit", "--config", str(config), "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path),
         "--trainer.logger.init_args.save_dir", str(tmp_path), "--model.tokenizer", TOKENIZER,
         "--data.init_args.data_files", str(ROOT / "examples" / "assets" / "reverse_prompts.jsonl")],
        model_class=GRPOFineTune,
    )
    metrics = (Path(cli.trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    for name in ("reward", "rewards/reference_match/mean", "completions/mean_length", "entropy", "tokens_per_sec"):
        assert name in header, name
