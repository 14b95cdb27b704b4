"""Reinforcement-learning losses on the LM head without (tokens x vocab) logits.

:func:`chunked_logprobs` gives each target token's log-probability (and the entropy) chunk by
chunk; :class:`FusedLinearGRPOLoss` builds the GRPO family of policy losses (GRPO, DAPO, Dr. GRPO,
BNPO; token- or sequence-level importance sampling) on top of it.
"""

from lightning_fastft.rl.grpo import FusedLinearGRPOLoss
from lightning_fastft.rl.logprobs import chunked_logprobs, chunked_logprobs_reference

__all__ = ["FusedLinearGRPOLoss", "chunked_logprobs", "chunked_logprobs_reference"]
