"""The GRPO family of policy losses on the LM head, from chunked log-probabilities.

The definition is TRL's ``GRPOTrainer._compute_loss``. For a batch of ``B`` completions padded to
``L`` tokens, mask ``m`` (1 on completion tokens), advantages ``A`` (one per completion),
``logp = log pi(y_t)`` from :func:`lightning_fastft.rl.chunked_logprobs` (temperature and soft cap
as the sampler used), ``old`` the sampling policy's log-probs (``logp.detach()`` when not given:
on-policy, ratio 1) and ``ref`` the reference model's::

    r_t     = logp_t - old_t                                        (token level)
            = sum_t m_t (logp_t - old_t) / max(sum_t m_t, 1)  for every t of the sequence  ("sequence", GSPO)
    ratio   = exp(r),  clipped = clamp(ratio, 1 - eps_low, 1 + eps_high)
    l_t     = -min(ratio A, clipped A) + beta (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)
                                                                    (the k3 KL estimator; beta > 0 only)
    grpo:    mean_b [ sum_t m l / max(sum_t m, 1) ]
    bnpo:    sum m l / max(sum m, 1)
    dr_grpo: sum m l / (B * max_completion_length)      (max_completion_length: mask width if None)
    dapo:    sum m l / num_items_in_batch               (default: sum m, this batch's tokens)

Masked (padding) positions take no part: their targets are replaced by token 0 before the
log-probs are computed, and their ``logp - old`` and ``ref - logp`` by 0, so garbage there (even
``inf``) cannot reach the loss or its gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from .logprobs import check_token_ids, chunked_logprobs

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


class FusedLinearGRPOLoss(nn.Module):
    """GRPO / DAPO / Dr. GRPO / BNPO loss of ``hidden @ weight.T`` without (tokens x vocab) logits.

    Args:
        beta: weight of the KL penalty to the reference policy (0: none, ``ref_logps`` optional).
        epsilon_low, epsilon_high: the ratio is clipped to ``[1 - epsilon_low, 1 + epsilon_high]``
            (DAPO's clip-higher: ``epsilon_high > epsilon_low``).
        loss_type: ``"grpo"``, ``"dapo"``, ``"dr_grpo"`` or ``"bnpo"`` (normalisations in the module
            docstring).
        importance_sampling_level: ``"token"`` (a ratio per token) or ``"sequence"`` (GSPO: the
            exponentiated mean log-ratio of each completion, for all its tokens).
        temperature: the sampling temperature; the log-probs are those of ``softmax(logits / T)``.
        max_completion_length: Dr. GRPO's constant normaliser; when None, the mask's width (which
            varies with the batch's padding). Completions wider than it are rejected.
        logit_softcap: the model's logit soft cap (Gemma), applied before the temperature.
        chunk_size: rows per logits chunk (default: the byte budget of ``LOGITS_CHUNK_BYTES``).

    ``forward(hidden, weight, completion_ids, completion_mask, advantages, old_logps=None,
    ref_logps=None, num_items_in_batch=None) -> (loss, metrics)``:

    * hidden (B, L, H): the hidden state that *predicts* each completion token (the caller shifts:
      with TRL's ``logits_to_keep``, ``last_hidden[:, -L - 1:-1]``); weight (V, H): the LM head.
    * completion_ids (B, L) int; completion_mask (B, L) of 0/1 (bool, int or float); advantages
      (B,); old_logps, ref_logps (B, L) fp log-probs of the sampling and reference policies.
    * num_items_in_batch (``"dapo"`` only): the normaliser, to be the completion-token count of the
      whole accumulation window over all ranks (as TRL passes it) so that accumulated / reduced
      gradients equal one large batch's; when None, this batch's token count. (TRL divides it by
      the number of processes because DDP averages gradients across ranks; pass it accordingly.)

    ``metrics`` (detached fp32 scalars): ``"kl"`` (masked token mean of the KL estimator, when
    ``ref_logps`` is given), ``"entropy"`` (masked token mean of the policy entropy),
    ``"clip_ratio/low_mean"`` (share with ratio < 1 - eps_low and A < 0), ``"clip_ratio/high_mean"``
    (ratio > 1 + eps_high and A > 0) and ``"clip_ratio/region_mean"`` (either): shares of completion
    tokens at token level, of completions at sequence level (as TRL).
    """

    def __init__(
        self,
        beta: float = 0.0,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "grpo",
        importance_sampling_level: str = "token",
        temperature: float = 1.0,
        max_completion_length: int | None = None,
        *,
        logit_softcap: float | None = None,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                f"got {importance_sampling_level!r}"
            )
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if not (0 <= epsilon_low < 1):
            raise ValueError(f"epsilon_low must be in [0, 1), got {epsilon_low}")
        if not epsilon_high >= 0:
            raise ValueError(f"epsilon_high must be >= 0, got {epsilon_high}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if max_completion_length is not None and (
            int(max_completion_length) != max_completion_length or max_completion_length < 1
        ):
            raise ValueError(f"max_completion_length must be a positive integer or None, got {max_completion_length}")
        self.beta = float(beta)
        self.epsilon_low = float(epsilon_low)
        self.epsilon_high = float(epsilon_high)
        self.loss_type = loss_type
        self.importance_sampling_level = importance_sampling_level
        self.temperature = float(temperature)
        self.max_completion_length = max_completion_length
        self.logit_softcap = logit_softcap
        self.chunk_size = chunk_size

    def extra_repr(self) -> str:
        return (
            f"loss_type={self.loss_type!r}, importance_sampling_level={self.importance_sampling_level!r}, "
            f"beta={self.beta}, epsilon_low={self.epsilon_low}, epsilon_high={self.epsilon_high}, "
            f"temperature={self.temperature}, max_completion_length={self.max_completion_length}"
        )

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        advantages: torch.Tensor,
        old_logps: torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = self._check_inputs(
            hidden, weight, completion_ids, completion_mask, advantages, old_logps, ref_logps, num_items_in_batch
        )
        batch, width = completion_ids.shape
        valid = mask.bool()
        targets = completion_ids.masked_fill(~valid, 0)  # padding ids (any value) are never read
        check_token_ids(targets, weight.shape[0], "completion_ids")
        logp, entropy = chunked_logprobs(
            hidden, weight, targets, temperature=self.temperature, logit_softcap=self.logit_softcap,
            chunk_size=self.chunk_size, return_entropy=True,
        )
        old = logp.detach() if old_logps is None else old_logps.to(logp)
        log_ratio = torch.where(valid, logp - old, 0.0)
        tokens_per_sequence = mask.sum(-1).clamp(min=1.0)
        if self.importance_sampling_level == "sequence":
            log_weights = ((log_ratio * mask).sum(-1) / tokens_per_sequence).unsqueeze(-1)  # (B, 1)
        else:
            log_weights = log_ratio
        ratio = torch.exp(log_weights)
        clipped = torch.clamp(ratio, 1 - self.epsilon_low, 1 + self.epsilon_high)
        adv = advantages.to(logp).unsqueeze(-1)
        per_token_loss = -torch.min(ratio * adv, clipped * adv)
        kl = None
        if ref_logps is not None:
            delta = torch.where(valid, ref_logps.to(logp) - logp, 0.0)
            kl = torch.exp(delta) - delta - 1
            if self.beta > 0:
                per_token_loss = per_token_loss + self.beta * kl
        per_token_loss = per_token_loss.expand(batch, width) * mask

        if self.loss_type == "grpo":
            loss = (per_token_loss.sum(-1) / tokens_per_sequence).mean()
        elif self.loss_type == "bnpo":
            loss = per_token_loss.sum() / mask.sum().clamp(min=1.0)
        elif self.loss_type == "dr_grpo":
            length = width if self.max_completion_length is None else self.max_completion_length
            loss = per_token_loss.sum() / (batch * length)
        else:  # dapo
            normaliser = mask.sum().clamp(min=1.0) if num_items_in_batch is None else num_items_in_batch
            if torch.is_tensor(normaliser):
                normaliser = normaliser.to(device=per_token_loss.device, dtype=torch.float32)
            loss = per_token_loss.sum() / normaliser

        with torch.no_grad():
            n_tokens = mask.sum().clamp(min=1.0)

            def token_mean(x):
                return (x * mask).sum() / n_tokens

            def share(x):  # TRL's masked_batch_mean: per completion at sequence level
                x = x.float()
                return x.mean() if x.shape[-1] == 1 else token_mean(x)

            low = (ratio < 1 - self.epsilon_low) & (adv < 0)
            high = (ratio > 1 + self.epsilon_high) & (adv > 0)
            metrics = {
                "entropy": token_mean(entropy.detach()),
                "clip_ratio/low_mean": share(low),
                "clip_ratio/high_mean": share(high),
                "clip_ratio/region_mean": share(low | high),
            }
            if kl is not None:
                metrics["kl"] = token_mean(kl.detach())
        return loss, metrics

    def _check_inputs(
        self, hidden, weight, completion_ids, completion_mask, advantages, old_logps, ref_logps, num_items_in_batch
    ) -> torch.Tensor:
        """Shapes, dtypes and values; returns the mask as fp32 0/1 on hidden's device."""
        if hidden.dim() != 3:
            raise ValueError(f"hidden must be (B, L, H), got shape {tuple(hidden.shape)}")
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
            raise ValueError(
                f"weight must be (V, H) with H = hidden.shape[-1] = {hidden.shape[2]}, got {tuple(weight.shape)}"
            )
        batch_shape = tuple(hidden.shape[:2])
        if tuple(completion_ids.shape) != batch_shape:
            raise ValueError(f"completion_ids must be (B, L) = {batch_shape}, got {tuple(completion_ids.shape)}")
        if completion_ids.dtype.is_floating_point or completion_ids.dtype == torch.bool:
            raise ValueError(f"completion_ids must be an integer tensor, got {completion_ids.dtype}")
        if tuple(completion_mask.shape) != batch_shape:
            raise ValueError(f"completion_mask must be (B, L) = {batch_shape}, got {tuple(completion_mask.shape)}")
        if tuple(advantages.shape) != batch_shape[:1]:
            raise ValueError(f"advantages must be (B,) = {batch_shape[:1]}, got {tuple(advantages.shape)}")
        for name, value in (("old_logps", old_logps), ("ref_logps", ref_logps)):
            if value is not None and tuple(value.shape) != batch_shape:
                raise ValueError(f"{name} must be (B, L) = {batch_shape}, got {tuple(value.shape)}")
        if self.beta > 0 and ref_logps is None:
            raise ValueError(f"beta = {self.beta} > 0 needs ref_logps (the reference policy's log-probs)")
        if num_items_in_batch is not None and self.loss_type != "dapo":
            raise ValueError(
                f"num_items_in_batch is the normaliser of loss_type='dapo' only, got loss_type={self.loss_type!r}"
            )
        if self.loss_type == "dr_grpo" and (self.max_completion_length or batch_shape[1]) < batch_shape[1]:
            raise ValueError(
                f"completions are {batch_shape[1]} tokens wide, more than max_completion_length="
                f"{self.max_completion_length} (Dr. GRPO's normaliser): raise it"
            )
        mask = completion_mask.to(device=hidden.device, dtype=torch.float32)
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError("completion_mask must hold only 0 and 1")
        return mask
