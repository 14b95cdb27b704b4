"""The patch options, declared once: the strategies, the ``FastFT`` callback and ``patch_model``
take these fields as keyword options (:data:`takes_patch_options` lists them in each signature,
so LightningCLI, ``--help`` and ``inspect`` see them), and this module validates them.

Imports nothing heavy: ``import lightning_fastft`` (strategies, callbacks) reads it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Optional, get_args

from lightning_fastft._settings import takes_fields

LayerCheckpointing = Literal["recompute", "offload"]
"""How one decoder layer is checkpointed: ``"recompute"`` keeps the layer's input on the device,
``"offload"`` in pinned host memory (copied on a side stream, prefetched for backward); either way
the rest of its forward is recomputed in backward."""

Checkpointing = Literal[LayerCheckpointing, "auto"]
"""Activation checkpointing of the decoder layers: every layer ``"recompute"`` or ``"offload"``
(:data:`LayerCheckpointing`), or ``"auto"``: per layer none, recompute or offload, the fastest plan
whose estimated peak fits ``memory_budget_gib`` (see :mod:`lightning_fastft.training.memory_plan`)."""

CHECKPOINTING: tuple[str, ...] = get_args(Checkpointing)


def check_bool_options(**options: Any) -> None:
    """Raise ``TypeError`` naming the first option whose value is not a ``bool`` (e.g. ``"false"``)."""
    for name, value in options.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_checkpointing(
    checkpointing: Any,
    *,
    checkpoint_fraction: Any = 1.0,
    memory_budget_gib: Any = None,
    optional: bool = True,
) -> None:
    """Raise ``ValueError`` unless the checkpointing options go together: ``checkpointing`` one of
    :data:`CHECKPOINTING` (or None when ``optional``), ``checkpoint_fraction`` in (0, 1] and left at
    1 under ``"auto"`` (which picks the layers itself), ``memory_budget_gib`` None or a positive
    number, and given only with ``"auto"``."""
    allowed = (None, *CHECKPOINTING) if optional else CHECKPOINTING
    if checkpointing not in allowed:
        raise ValueError(f"checkpointing must be one of {allowed}, got {checkpointing!r}")
    check_checkpoint_fraction(checkpoint_fraction)
    if checkpointing == "auto" and checkpoint_fraction != 1:
        raise ValueError(
            f"checkpoint_fraction={checkpoint_fraction!r} conflicts with checkpointing='auto', which chooses "
            "the checkpointed layers itself (to fit memory_budget_gib); leave checkpoint_fraction at 1"
        )
    if memory_budget_gib is None:
        return
    if checkpointing != "auto":
        raise ValueError(
            f"memory_budget_gib={memory_budget_gib!r} is read by checkpointing='auto' only, "
            f"got checkpointing={checkpointing!r}"
        )
    is_number = isinstance(memory_budget_gib, (int, float)) and not isinstance(memory_budget_gib, bool)
    if not (is_number and math.isfinite(memory_budget_gib) and memory_budget_gib > 0):
        raise ValueError(f"memory_budget_gib must be a positive number of GiB, got {memory_budget_gib!r}")


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
        checkpointing: ``None`` (off), ``"recompute"``, ``"offload"`` or ``"auto"``: see :data:`Checkpointing`.
        checkpoint_fraction: share in (0, 1] of each decoder stack's layers checkpointed
            (``round(fraction * n)`` of ``n``, evenly spread; the others keep their activations).
            Not with ``"auto"``.
        memory_budget_gib: ``"auto"`` only: the peak device memory (GiB, as
            ``torch.cuda.max_memory_allocated`` counts it) the plan must fit; default (None): the
            device's free memory when the plan is made minus a margin
            (:func:`~lightning_fastft.training.memory_plan.default_memory_budget`). Needed on a CPU.
        cuda_graphs: replay each decoder layer's training forward and backward from CUDA graphs
            captured once (:mod:`~lightning_fastft.training.cuda_graphs`): for host-bound steps (small
            batches) with fixed shapes. Not with ``checkpointing="offload"`` (under ``"auto"`` the layers
            its plan offloads run without graphs).
    """

    rms_norm: bool = True
    rope: bool = True
    mlp: bool = True
    cross_entropy: bool = True
    fused_lora: bool = True
    checkpointing: Optional[Checkpointing] = None
    checkpoint_fraction: float = 1.0
    memory_budget_gib: Optional[float] = None
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        check_bool_options(**self.kernel_switches(), cuda_graphs=self.cuda_graphs)
        check_checkpointing(
            self.checkpointing, checkpoint_fraction=self.checkpoint_fraction, memory_budget_gib=self.memory_budget_gib
        )
        if self.cuda_graphs and self.checkpointing == "offload":
            raise ValueError(
                "cuda_graphs=True does not go with checkpointing='offload': offloaded layers copy to the host "
                "on a side stream, which a CUDA graph cannot capture (use 'recompute', 'auto' or None)"
            )

    def checkpointing_options(self) -> dict[str, Any]:
        """The activation-checkpointing fields (:data:`CHECKPOINTING_FIELDS`) but ``checkpointing``,
        as keywords of :func:`~lightning_fastft.training.checkpointing.apply_activation_checkpointing`."""
        return {name: getattr(self, name) for name in CHECKPOINTING_FIELDS if name != "checkpointing"}

    def kernel_switches(self) -> dict[str, bool]:
        """The on/off switches of the kernel patches (every field but :data:`CHECKPOINTING_FIELDS` and ``cuda_graphs``)."""
        fields = dataclasses.asdict(self).items()
        return {name: value for name, value in fields if name not in (*CHECKPOINTING_FIELDS, "cuda_graphs")}


CHECKPOINTING_FIELDS = ("checkpointing", "checkpoint_fraction", "memory_budget_gib")
"""The :class:`PatchOptions` fields of activation checkpointing."""


takes_patch_options = takes_fields(PatchOptions)
"""Declare the :class:`PatchOptions` fields in the signature of a function taking them as ``**options``."""
