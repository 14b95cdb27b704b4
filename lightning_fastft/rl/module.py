"""GRPO fine-tuning as a LightningModule: sample, score, and train on the policy's own completions.

One ``training_step`` per batch of prompts (:class:`PromptDataModule`):

1. **generate** ``num_generations`` completions per prompt with HF ``generate`` on the (patched)
   policy, KV cache on, sampling with ``temperature`` / ``top_p`` / ``top_k``, at most
   ``max_completion_length`` tokens; a completion ends at (and includes) its first EOS token.
2. **score** them with the reward functions (:mod:`lightning_fastft.rl.rewards`) and turn the
   weighted rewards into group-normalised advantages (TRL's ``scale_rewards`` options).
3. **log-probs** without gradient, chunked (:func:`~lightning_fastft.rl.chunked_logprobs`): the
   sampling policy's (``old``, only when ``num_iterations > 1``; else the loss is on-policy) and
   the reference policy's (``beta > 0``): the same model with the LoRA adapter disabled, so no
   second copy of the weights exists.
4. **train**: ``num_iterations`` optimizer steps over all completions, each accumulated over
   micro-batches of ``micro_batch_size`` completions (:class:`~lightning_fastft.rl.FusedLinearGRPOLoss`
   on the last hidden states and the LM head: never a (tokens x vocab) tensor). Each micro-batch
   runs forward and backward before the next one starts, so with activation checkpointing /
   offload (the ``fastft`` strategies' ``checkpointing``) only one micro-batch's layer inputs
   exist at a time. The micro-batch losses are scaled so that the gradient equals the one of a
   single batch of all completions, for every ``loss_type`` (``"dapo"``: normalised by the
   completion tokens of all ranks, as TRL's ``num_items_in_batch``); data-parallel gradients
   synchronise on the last micro-batch only.

Positions follow the prompt's real tokens (``cumsum(attention_mask) - 1``, as ``generate`` used),
so the log-probs are those of the distribution the completions were sampled from.

Logged each step (to every logger): ``reward`` (mean and ``reward_std``), ``rewards/<function>/mean``
and ``/std``, ``kl`` (``beta > 0``), ``entropy``, ``clip_ratio/{low,high,region}_mean``,
``completions/mean_length`` / ``min_length`` / ``max_length`` / ``clipped_ratio`` (no EOS within
``max_completion_length``), and ``loss``; with :class:`~lightning_fastft.FastFTMetrics` (added when
the Trainer has none) ``tokens_per_sec`` over prompt + completion tokens.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_fastft._hf import unwrap_peft
from lightning_fastft.data.synthetic import TINY_LLAMA_CONFIG
from lightning_fastft.module import CausalLMFineTune
from lightning_fastft.qlora import QuantType
from lightning_fastft.rl.grpo import FusedLinearGRPOLoss
from lightning_fastft.rl.logprobs import chunked_logprobs
from lightning_fastft.rl.rewards import (
    SCALE_REWARDS,
    RewardFunction,
    ScaleRewards,
    group_advantages,
    nanstd,
    resolve_reward_function,
    reward_function_name,
    score_completions,
    warn_unscored,
    weighted_rewards,
)

PROMPT_COLUMN = "prompt"
_LOGIT_MODIFIERS = ("logit_scale", "logits_scaling", "output_multiplier_scale")  # heads GRPO would get wrong


class GRPOFineTune(CausalLMFineTune):
    """GRPO / DAPO / Dr. GRPO / BNPO / GSPO fine-tuning of a HF causal LM (LoRA, QLoRA or full).

    Args:
        model, lora_r, lora_alpha, lora_dropout, target_modules, quant_type, learning_rate,
            weight_decay, betas, warmup_steps, init_seed: as :class:`~lightning_fastft.module.CausalLMFineTune`.
        tokenizer: a tokenizer directory (``AutoTokenizer.from_pretrained``) or a tokenizer object;
            default: the model directory. It needs an EOS token (completions end there).
        reward_funcs: callables ``f(prompts, completions, **columns) -> list[float | None]``, or their
            import paths (``"lightning_fastft.rl.rewards.reference_match"``).
        reward_weights: one weight per reward function (default: all 1).
        num_generations: completions sampled per prompt (a group; at least 2).
        max_prompt_length: prompts longer than this keep their last tokens (with a warning).
        max_completion_length: at most this many generated tokens; also Dr. GRPO's normaliser.
        temperature, top_p, top_k: sampling settings; ``temperature`` also scales the logits of the
            log-probs (as TRL), ``top_k=0`` disables top-k.
        beta: KL penalty weight to the reference (the base with the adapter disabled; LoRA only).
        epsilon, epsilon_high: the ratio is clipped to ``[1 - epsilon, 1 + epsilon_high]``
            (``epsilon_high`` defaults to ``epsilon``; DAPO's clip-higher sets it larger).
        loss_type, importance_sampling_level: see :class:`~lightning_fastft.rl.FusedLinearGRPOLoss`.
        scale_rewards: ``"group"`` (divide by the group's reward std), ``"batch"`` (by the whole
            batch's, across ranks) or ``"none"``.
        num_iterations: optimizer steps per generated batch (TRL's mu); > 1 makes the later ones
            off-policy (ratios against the sampling policy's log-probs, clipped).
        micro_batch_size: completions per forward/backward (default: all of the step's).
        mask_truncated_completions: completions without EOS within ``max_completion_length`` take
            no part in the loss.
        max_grad_norm: gradient-norm clipping before each optimizer step (None: none).
        chunk_size: rows per logits chunk of the log-probs (default: a byte budget).
    """

    def __init__(
        self,
        model: Union[str, dict[str, Any]] = TINY_LLAMA_CONFIG,
        tokenizer: Any = None,
        reward_funcs: Sequence[Union[str, RewardFunction]] = (),
        reward_weights: Optional[list[float]] = None,
        num_generations: int = 8,
        max_prompt_length: Optional[int] = None,
        max_completion_length: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        beta: float = 0.0,
        epsilon: float = 0.2,
        epsilon_high: Optional[float] = None,
        loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = "dapo",
        importance_sampling_level: Literal["token", "sequence"] = "token",
        scale_rewards: ScaleRewards = "group",
        num_iterations: int = 1,
        micro_batch_size: Optional[int] = None,
        mask_truncated_completions: bool = False,
        max_grad_norm: Optional[float] = 1.0,
        chunk_size: Optional[int] = None,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        target_modules: Union[str, list[str]] = "all-linear",
        quant_type: Optional[QuantType] = None,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 0,
        init_seed: Optional[int] = None,
    ) -> None:
        super().__init__(
            model=model, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            target_modules=target_modules, quant_type=quant_type, learning_rate=learning_rate,
            weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps, init_seed=init_seed,
            max_new_tokens=max_completion_length,
        )
        self.reward_funcs = [resolve_reward_function(f) for f in reward_funcs]
        if not self.reward_funcs:
            raise ValueError("GRPO needs at least one reward function (reward_funcs)")
        weights = [1.0] * len(self.reward_funcs) if reward_weights is None else list(reward_weights)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(f"{len(weights)} reward_weights for {len(self.reward_funcs)} reward_funcs")
        self.reward_names = [reward_function_name(f) for f in self.reward_funcs]
        if len(set(self.reward_names)) != len(self.reward_names):
            raise ValueError(f"reward functions need distinct names (they are logged by name): {self.reward_names}")
        self.register_buffer("reward_weights", torch.tensor(weights, dtype=torch.float32), persistent=False)
        _check_positive_int(num_generations=num_generations, max_completion_length=max_completion_length,
                            num_iterations=num_iterations)
        if num_generations < 2:
            raise ValueError(f"num_generations must be at least 2 (advantages compare completions of a prompt), "
                             f"got {num_generations}")
        _check_positive_int(max_prompt_length=max_prompt_length, micro_batch_size=micro_batch_size)
        if not (0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if int(top_k) != top_k or top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {top_k}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
        if beta > 0 and lora_r == 0:
            raise ValueError(
                "beta > 0 compares to the reference policy, which is the base model with the LoRA adapter "
                "disabled: it needs lora_r > 0 (full fine-tuning keeps no reference copy)"
            )
        self.grpo_loss = FusedLinearGRPOLoss(
            beta=beta, epsilon_low=epsilon, epsilon_high=epsilon if epsilon_high is None else epsilon_high,
            loss_type=loss_type, importance_sampling_level=importance_sampling_level, temperature=temperature,
            max_completion_length=max_completion_length, chunk_size=chunk_size,
        )
        if scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
        # callables are not hyper-parameters a checkpoint can hold: keep their names
        self.hparams.reward_funcs = [f if isinstance(f, str) else reward_function_name(f) for f in reward_funcs]
        if tokenizer is not None and not isinstance(tokenizer, str):
            self.hparams.tokenizer = None
        self.tokenizer = tokenizer
        self.automatic_optimization = False

    # ---- set-up ---------------------------------------------------------------------------
    def configure_model(self) -> None:
        super().configure_model()
        if isinstance(self.tokenizer, str) or self.tokenizer is None:
            self.tokenizer = _load_tokenizer(self.tokenizer, self.hparams.model)
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token: completions could never end")
        self.grpo_loss.logit_softcap = _final_logit_softcap(self.model)

    def configure_callbacks(self) -> list[pl.Callback]:
        from lightning_fastft.callbacks.metrics import FastFTMetrics

        if self._trainer is not None and any(isinstance(c, FastFTMetrics) for c in self.trainer.callbacks):
            return []
        return [FastFTMetrics()]

    # ---- the step -------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Optional[dict[str, torch.Tensor]]:
        prompts, columns = _prompts_and_columns(batch, self.hparams.num_generations)
        start = time.perf_counter()
        rollout = self.generate_completions(prompts)
        generated = time.perf_counter()
        advantages, metrics = self._advantages(prompts, rollout, columns)
        metrics.update(_completion_metrics(rollout))
        mask = rollout["completion_mask"]
        local_tokens = mask.sum()
        global_tokens = self.trainer.strategy.reduce(local_tokens.float(), reduce_op="sum")
        if float(global_tokens) == 0:
            warnings.warn(
                "GRPO step skipped: every completion of this batch is masked out (empty, or truncated with "
                "mask_truncated_completions=True)",
                stacklevel=2,
            )
            return None
        old_logps = self.completion_logps(rollout) if self.hparams.num_iterations > 1 else None
        ref_logps = None
        if self.grpo_loss.beta > 0:
            with self.model.disable_adapter():
                ref_logps = self.completion_logps(rollout)

        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        for _ in range(self.hparams.num_iterations):
            step_metrics = self._accumulate_gradients(rollout, advantages, old_logps, ref_logps, global_tokens)
            if self.hparams.max_grad_norm is not None:
                self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
        metrics.update(step_metrics)
        metrics["timing/generation_sec"] = torch.tensor(generated - start)
        metrics["timing/train_sec"] = torch.tensor(time.perf_counter() - generated)
        self.log("reward", metrics.pop("reward"), prog_bar=True, on_step=True, batch_size=len(prompts))
        self.log_dict({name: value.float() for name, value in metrics.items()}, on_step=True, batch_size=len(prompts))
        return {"input_ids": rollout["input_ids"], "attention_mask": rollout["attention_mask"]}

    @torch.no_grad()
    def generate_completions(self, prompts: list[str]) -> dict[str, Any]:
        """Sample the completions of ``prompts`` (each already repeated ``num_generations`` times).

        Returns ``input_ids`` / ``attention_mask`` / ``position_ids`` of prompt + completion rows
        (prompts left-padded to ``prompt_width``, completions right-padded), ``completion_ids`` and
        ``completion_mask`` (1 up to and including the first EOS), ``truncated`` (no EOS) and the
        decoded ``completions`` (special tokens skipped).
        """
        hp, tokenizer = self.hparams, self.tokenizer
        encoded = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        if hp.max_prompt_length is not None and any(len(ids) > hp.max_prompt_length for ids in encoded):
            warnings.warn(f"prompts longer than max_prompt_length={hp.max_prompt_length} keep their last tokens",
                          stacklevel=2)
            encoded = [ids[-hp.max_prompt_length:] for ids in encoded]
        if any(len(ids) == 0 for ids in encoded):
            raise ValueError("an empty prompt (no tokens) cannot be continued")
        width = max(len(ids) for ids in encoded)
        pad_id = _pad_token_id(tokenizer)
        prompt_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], device=self.device)
        prompt_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=self.device)

        was_training = self.model.training
        self.model.eval()
        try:
            sequences = self.model.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, temperature=hp.temperature,
                top_p=hp.top_p, top_k=hp.top_k or None, max_new_tokens=hp.max_completion_length,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id, use_cache=True,
            )
        finally:
            self.model.train(was_training)
        completion_ids = sequences[:, width:]
        is_eos = completion_ids == tokenizer.eos_token_id
        # 1 up to and including the first EOS (rows without one: all of it)
        completion_mask = (is_eos.cumsum(-1) - is_eos.long() == 0).long()
        truncated = ~is_eos.any(-1)
        if hp.mask_truncated_completions:
            completion_mask = completion_mask * (~truncated).long().unsqueeze(-1)
        completion_ids = completion_ids.masked_fill(completion_mask == 0, pad_id)
        texts = tokenizer.batch_decode(
            [ids[: int(n)].tolist() for ids, n in zip(completion_ids, (completion_mask.sum(-1)))],
            skip_special_tokens=True,
        )
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        return {
            "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
            "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1),
            "prompt_width": width,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "truncated": truncated,
            "completions": texts,
        }

    def completion_hidden(self, rollout: Mapping[str, Any], rows: slice) -> torch.Tensor:
        """Last hidden states predicting each completion token of ``rows``: (rows, completion width, H)."""
        causal_lm = unwrap_peft(self.model)
        output = causal_lm.get_decoder()(
            input_ids=rollout["input_ids"][rows], attention_mask=rollout["attention_mask"][rows],
            position_ids=rollout["position_ids"][rows], use_cache=False,
        )
        width = rollout["prompt_width"]
        return output.last_hidden_state[:, width - 1 : -1]

    @torch.no_grad()
    def completion_logps(self, rollout: Mapping[str, Any]) -> torch.Tensor:
        """fp32 log-probabilities of the completion tokens under the current weights, chunked
        (padding positions hold the log-prob of the pad id: the loss ignores them)."""
        weight = _lm_head_weight(self.model)
        parts = [
            chunked_logprobs(
                self.completion_hidden(rollout, rows), weight, rollout["completion_ids"][rows],
                temperature=self.grpo_loss.temperature, logit_softcap=self.grpo_loss.logit_softcap,
                chunk_size=self.grpo_loss.chunk_size,
            )
            for rows in self._micro_batches(rollout)
        ]
        return torch.cat(parts)

    # ---- pieces of the step ---------------------------------------------------------------
    def _micro_batches(self, rollout: Mapping[str, Any]) -> list[slice]:
        n = rollout["completion_ids"].shape[0]
        size = self.hparams.micro_batch_size or n
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def _advantages(
        self, prompts: list[str], rollout: Mapping[str, Any], columns: dict[str, list[Any]]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        per_function = score_completions(self.reward_funcs, prompts, rollout["completions"], columns)
        warn_unscored(per_function, self.reward_names)
        per_function = per_function.to(self.device)
        rewards = weighted_rewards(per_function, self.reward_weights)
        batch_std = nanstd(self.all_gather(rewards).reshape(-1)) if self.hparams.scale_rewards == "batch" else None
        advantages = group_advantages(rewards, self.hparams.num_generations, self.hparams.scale_rewards, batch_std)
        metrics = {"reward": torch.nanmean(rewards), "reward_std": nanstd(rewards),
                   "frac_reward_zero_std": (nanstd(rewards.view(-1, self.hparams.num_generations), dim=1) == 0)
                   .float().mean()}
        for k, name in enumerate(self.reward_names):
            metrics[f"rewards/{name}/mean"] = torch.nanmean(per_function[:, k])
            metrics[f"rewards/{name}/std"] = nanstd(per_function[:, k])
        return advantages, metrics

    def _accumulate_gradients(
        self,
        rollout: Mapping[str, Any],
        advantages: torch.Tensor,
        old_logps: Optional[torch.Tensor],
        ref_logps: Optional[torch.Tensor],
        global_tokens: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Forward + backward of every micro-batch; gradients sum to those of one batch of all rows."""
        loss_fn, mask = self.grpo_loss, rollout["completion_mask"]
        n_rows, local_tokens = mask.shape[0], mask.sum().clamp(min=1)
        weight = _lm_head_weight(self.model)
        micro_batches = self._micro_batches(rollout)
        totals: dict[str, torch.Tensor] = {}
        for index, rows in enumerate(micro_batches):
            rows_mask = mask[rows]
            extra = {}
            if loss_fn.loss_type == "dapo":  # TRL: the tokens of all ranks over the ranks (DDP averages)
                extra["num_items_in_batch"] = global_tokens / self.trainer.world_size
                scale = 1.0
            elif loss_fn.loss_type == "bnpo":
                scale = rows_mask.sum().clamp(min=1) / local_tokens
            else:  # grpo, dr_grpo: means over rows
                scale = rows_mask.shape[0] / n_rows
            last = index == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last else _no_gradient_sync(self.trainer.strategy)
            with sync:
                loss, metrics = loss_fn(
                    self.completion_hidden(rollout, rows), weight, rollout["completion_ids"][rows], rows_mask,
                    advantages[rows],
                    None if old_logps is None else old_logps[rows],
                    None if ref_logps is None else ref_logps[rows],
                    **extra,
                )
                self.manual_backward(loss * scale)
            # metrics: token means weighted by tokens, sequence-level shares by rows
            tokens = rows_mask.sum()
            for name, value in metrics.items():
                per_sequence = name.startswith("clip_ratio") and loss_fn.importance_sampling_level == "sequence"
                weight_of = rows_mask.shape[0] / n_rows if per_sequence else tokens / local_tokens
                totals[name] = totals.get(name, 0) + value * weight_of
            totals["loss"] = totals.get("loss", 0) + loss.detach() * scale
        return totals


class PromptDataModule(pl.LightningDataModule):
    """Batches of prompts (and their other columns) for :class:`GRPOFineTune`.

    Args:
        data_files: local file(s) for ``datasets.load_dataset`` (json/jsonl, csv, parquet), or
        dataset: a dataset name / directory for ``datasets.load_dataset`` (offline with
            ``HF_DATASETS_OFFLINE=1``), or a list of dicts;
        split: the split to train on.
        prompt_column: the column holding the prompt text (renamed ``"prompt"``); the other columns
            reach the reward functions by name.
        batch_size: prompts per step (each gets ``num_generations`` completions).
    """

    def __init__(
        self,
        data_files: Union[str, list[str], None] = None,
        dataset: Union[str, list[dict[str, Any]], None] = None,
        split: str = "train",
        prompt_column: str = PROMPT_COLUMN,
        batch_size: int = 4,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if (data_files is None) == (dataset is None):
            raise ValueError("give exactly one of data_files and dataset")
        _check_positive_int(batch_size=batch_size)
        self.data_files, self.dataset = data_files, dataset
        self.split, self.prompt_column = split, prompt_column
        self.batch_size, self.shuffle, self.seed, self.num_workers = batch_size, shuffle, seed, num_workers
        self.rows: Optional[list[dict[str, Any]]] = None

    def setup(self, stage: str) -> None:
        if self.rows is not None:
            return
        if isinstance(self.dataset, list):
            rows = [dict(row) for row in self.dataset]
        else:
            import datasets

            if self.data_files is not None:
                files = [self.data_files] if isinstance(self.data_files, str) else list(self.data_files)
                extension = files[0].rsplit(".", 1)[-1]
                builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(extension)
                if builder is None:
                    raise ValueError(f"data_files must be .json/.jsonl/.csv/.parquet, got {files[0]!r}")
                loaded = datasets.load_dataset(builder, data_files=files, split=self.split)
            else:
                loaded = datasets.load_dataset(self.dataset, split=self.split)
            rows = list(loaded)
        if not rows or self.prompt_column not in rows[0]:
            raise ValueError(f"the prompts need a {self.prompt_column!r} column; got columns "
                             f"{sorted(rows[0]) if rows else '(no rows)'}")
        self.rows = [{PROMPT_COLUMN: row.pop(self.prompt_column), **row} for row in rows]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.rows, batch_size=self.batch_size, shuffle=self.shuffle, num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed), collate_fn=collate_prompts,
        )


def collate_prompts(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows of ``{"prompt": str, other columns...}`` -> ``{column: [values]}`` (no tensors)."""
    return {column: [row[column] for row in rows] for column in rows[0]}


def _prompts_and_columns(batch: Mapping[str, Any], num_generations: int) -> tuple[list[str], dict[str, list[Any]]]:
    """Each prompt and column value repeated ``num_generations`` times (consecutive: one group per prompt)."""
    if PROMPT_COLUMN not in batch:
        raise ValueError(f"a GRPO batch is a dict with a {PROMPT_COLUMN!r} list (see PromptDataModule), "
                         f"got keys {sorted(batch)}")

    def repeat(values: Any) -> list[Any]:
        values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
        return [value for value in values for _ in range(num_generations)]

    prompts = repeat(batch[PROMPT_COLUMN])
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be strings")
    return prompts, {name: repeat(values) for name, values in batch.items() if name != PROMPT_COLUMN}


def _completion_metrics(rollout: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    lengths = rollout["completion_mask"].sum(-1).float()
    return {
        "completions/mean_length": lengths.mean(),
        "completions/min_length": lengths.min(),
        "completions/max_length": lengths.max(),
        "completions/clipped_ratio": rollout["truncated"].float().mean(),
    }


def _no_gradient_sync(strategy: Any) -> contextlib.AbstractContextManager:
    """Skip the data-parallel gradient all-reduce of a backward (DDP's ``no_sync``); a no-op elsewhere."""
    block = getattr(strategy, "block_backward_sync", None)
    return block() if block is not None else contextlib.nullcontext()


def _lm_head_weight(model: torch.nn.Module) -> torch.Tensor:
    """The (V, H) weight of a plain ``nn.Linear`` LM head without bias (the fused loss's input)."""
    head = unwrap_peft(model).get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise NotImplementedError(
            f"GRPO's fused log-probs need a plain nn.Linear LM head, got {type(head).__name__} "
            "(a LoRA or quantised lm_head is not supported: leave lm_head out of target_modules)"
        )
    if head.bias is not None:
        raise NotImplementedError("GRPO's fused log-probs do not support an LM head with a bias")
    return head.weight


def _final_logit_softcap(model: torch.nn.Module) -> Optional[float]:
    """The model's final-logit soft cap (Gemma2), refusing heads that scale their logits otherwise."""
    config = unwrap_peft(model).config.get_text_config()
    for attribute in _LOGIT_MODIFIERS:
        if getattr(config, attribute, None) not in (None, 1, 1.0):
            raise NotImplementedError(f"GRPO's fused log-probs do not apply config.{attribute} to the logits")
    return getattr(config, "final_logit_softcapping", None)


def _load_tokenizer(tokenizer: Optional[str], model: Any) -> Any:
    from transformers import AutoTokenizer

    source = tokenizer if tokenizer is not None else model
    if not isinstance(source, str):
        raise ValueError("GRPOFineTune needs a tokenizer (a directory or object) when the model is built from a config")
    return AutoTokenizer.from_pretrained(source)


def _pad_token_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return tokenizer.eos_token_id if pad is None else pad


def _check_positive_int(**values: Optional[int]) -> None:
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
