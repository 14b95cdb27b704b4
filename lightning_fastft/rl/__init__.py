"""Reinforcement-learning fine-tuning (the GRPO family) without (tokens x vocab) logits.

:func:`chunked_logprobs` gives each target token's log-probability (and the entropy) chunk by
chunk; :class:`FusedLinearGRPOLoss` builds the GRPO family of policy losses (GRPO, DAPO, Dr. GRPO,
BNPO; token- or sequence-level importance sampling) on top of it; :class:`GRPOFineTune` trains a
policy on its own sampled completions (:mod:`lightning_fastft.rl.module`), with prompts from
:class:`PromptDataModule` and rewards from plain functions (:mod:`lightning_fastft.rl.rewards`).
"""

from lightning_fastft.rl.grpo import FusedLinearGRPOLoss
from lightning_fastft.rl.logprobs import chunked_logprobs, chunked_logprobs_reference
from lightning_fastft.rl.module import GRPOFineTune, PromptDataModule, collate_prompts
from lightning_fastft.rl.rewards import group_advantages, reference_match, score_completions, weighted_rewards

__all__ = [
    "FusedLinearGRPOLoss",
    "GRPOFineTune",
    "PromptDataModule",
    "chunked_logprobs",
    "chunked_logprobs_reference",
    "collate_prompts",
    "group_advantages",
    "reference_match",
    "score_completions",
    "weighted_rewards",
]
