"""The patch options, declared once: the strategies, the ``FastFT`` callback and ``patch_model``
take these fields as keyword options (:data:`takes_patch_options` lists them in each signature,
so LightningCLI, ``--help`` and ``inspect`` see them), and this module validates them.

Imports nothing heavy: ``import lightning_fastft`` (strategies, callbacks) reads it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Optional, get_args

from lightning_fastft._settings import takes_fields

Checkpointing = Literal["recompute", "offload"]
"""Activation checkpointing of the decoder layers: ``"recompute"`` keeps each layer's input on the
device, ``"offload"`` in pinned host memory (copied on a side stream, prefetched for backward)."""

CHECKPOINTING: tuple[str, ...] = get_args(Checkpointing)


def check_bool_options(**options: Any) -> None:
    """Raise ``TypeError`` naming the first option whose value is not a ``bool`` (e.g. ``"false"``)."""
    for name, value in options.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_checkpointing(checkpointing: Any, *, optional: bool = True) -> None:
    """Raise ``ValueError`` unless ``checkpointing`` is one of :data:`CHECKPOINTING` (or None when ``optional``)."""
    allowed = (None, *CHECKPOINTING) if optional else CHECKPOINTING
    if checkpointing not in allowed:
        raise ValueError(f"checkpointing must be one of {allowed}, got {checkpointing!r}")


def check_checkpoint_fraction(checkpoint_fraction: Any, *, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` unless ``checkpoint_fraction`` is a number in (0, 1] (a share of layers
    to checkpoint), or in [0, 1] with ``allow_zero`` (a share measured, 0 meaning none)."""
    fraction = checkpoint_fraction
    is_number = isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
    if not (is_number and (0 <= fraction if allow_zero else 0 < fraction) and fraction <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"checkpoint_fraction must be a number in {interval}, got {fraction!r}")


@dataclass(frozen=True)
class PatchOptions:
    """Which lightning_fastft patches to apply to the Hugging Face causal LMs inside a module.

    Args:
        rms_norm: RMSNorm modules (incl. Qwen3's q/k norms) run the RMSNorm kernel.
        rope: the attention forward applies RoPE in place on Q and K with the RoPE kernel.
        mlp: gated MLPs run the SwiGLU/GeGLU kernel.
        cross_entropy: training losses come from fused linear cross-entropy (no logits).
        fused_lora: PEFT LoRA projections run the fused LoRA QKV / O / MLP kernels where fusable.
        checkpointing: ``None`` (off), ``"recompute"`` or ``"offload"``: see :data:`Checkpointing`.
        checkpoint_fraction: share in (0, 1] of each decoder stack's layers checkpointed
            (``round(fraction * n)`` of ``n``, evenly spread; the others keep their activations).
    """

    rms_norm: bool = True
    rope: bool = True
    mlp: bool = True
    cross_entropy: bool = True
    fused_lora: bool = True
    checkpointing: Optional[Checkpointing] = None
    checkpoint_fraction: float = 1.0

    def __post_init__(self) -> None:
        check_bool_options(**self.kernel_switches())
        check_checkpointing(self.checkpointing)
        check_checkpoint_fraction(self.checkpoint_fraction)

    def kernel_switches(self) -> dict[str, bool]:
        """The on/off switches of the kernel patches (every field but the checkpointing ones)."""
        return {name: value for name, value in dataclasses.asdict(self).items() if not name.startswith("checkpoint")}


takes_patch_options = takes_fields(PatchOptions)
"""Declare the :class:`PatchOptions` fields in the signature of a function taking them as ``**options``."""
