"""Memory as a budget: the per-layer plan of ``checkpointing="auto"``.

Each decoder layer runs one of three ways (see :mod:`lightning_fastft.training.checkpointing`):

========== ================================= =================================================
mode       device memory the layer keeps      time it adds to a step
========== ================================= =================================================
none       ``A``: every tensor its forward   nothing
           saves for backward
recompute  ``I``: its input hidden states     its forward again in backward (~1/3 of the
                                             layer's forward + backward)
offload    nothing (input in pinned host     recompute's, plus two host copies of ``I`` on a
           memory)                           side stream, overlapped with compute
========== ================================= =================================================

**The rule** (:func:`plan_checkpointing`): keep as many layers as possible without checkpointing
(every other layer offloaded); then, of the checkpointed layers, recompute as many as possible on the
device and offload the rest. So it maximises the layers that cost nothing, counting an offload's
copies as free against a recompute: on the H200, Llama-3-8B LoRA step at batch 4 x 2048 (issue 13),
offload ran at recompute's speed (11484 vs 11480 tokens/s), its copies hidden behind the
recomputation; an offloaded layer instead of a recomputed one frees ``I``, and ``A / I`` is 15-20
on such layers, so one more layer without checkpointing is worth offloading ~15-20 others. Among
checkpointed layers recompute still goes first: it moves nothing over PCIe and pins no host memory.

**Where**: the checkpointed layers are the lowest of their stack (offloaded ones lowest, then the
recomputed ones), the layers without checkpointing the top ones. The backward of a layer runs while
every layer below it still holds what it keeps and those above have freed theirs, so what the low
layers keep weighs on every later backward, while the top layer's recomputation would run first,
next to everything kept: checkpointing it saves no peak memory at all.

**The estimate** (:func:`estimate_peak_bytes`), in bytes, for one batch shape, the largest of

* the end of the forward: ``fixed + sum(kept bytes of every layer) + loss workspace``;
* the backward of each layer: ``fixed + sum(kept bytes of the layers below it) + its own``, where a
  layer's own memory while its backward runs is its activations ``A`` and about as much again for
  their gradients: ``2A`` without checkpointing and with recompute (the kept input ``I`` and the
  recomputed rest), ``2A + I`` offloaded (the previous offloaded layer's input is being prefetched).

The terms:

* ``fixed``: the model state (:func:`model_state_bytes`: what is allocated on the device when the
  plan is made, i.e. the weights and the batch, plus the gradients and AdamW's two moments of the
  trainable parameters as long as they are not allocated yet).
* kept bytes: ``A`` (none), ``I`` (recompute) or 0 (offload). ``A`` is measured, not modelled:
  one layer's forward runs once more on the real batch (its input requiring a gradient, as every
  layer's but the first does) under
  ``torch.autograd.graph.saved_tensors_hooks`` and the distinct storages it saves are summed
  (:func:`saved_activation_bytes`; the parameters and the inputs all layers share, such as the
  rotary tables and the mask, are left out).
* loss workspace (:func:`loss_workspace_bytes`): the head and the loss at the end of the forward.

**Host memory**: every offloaded input sits in pinned host memory until its backward, all at once.
The offloaded layers are capped by what the host has available (Linux ``MemAvailable`` plus the
buffers the offloader already pools, less :data:`HOST_MARGIN_BYTES`); beyond the cap, layers are
recomputed. ``checkpointing="offload"`` itself refuses, with a ``MemoryError`` naming the numbers,
a buffer the host cannot hold (rather than letting the system's out-of-memory killer end the process).

The budget is the peak of ``torch.cuda.max_memory_allocated`` (every tensor of the process on the
device). Without ``memory_budget_gib`` it is the device's free memory when the plan is made plus what
PyTorch's caching allocator already holds, minus :data:`DEFAULT_MARGIN_FRACTION` of the device's
memory (:func:`default_memory_budget`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_fastft.patching.options import LayerCheckpointing

GIB = 2**30

DEFAULT_MARGIN_FRACTION = 0.1
"""The default budget leaves this share of the device's total memory unplanned: the caching
allocator's fragmentation (reserved but not allocated), memory outside it (CUDA context, cuBLAS and
Triton workspaces, NCCL) and the estimate's own error."""

HF_LOSS_BYTES_PER_LOGIT = 12
"""Bytes per logit, beyond the logits themselves, of Hugging Face's causal-LM loss: the fp32 copy,
its log-softmax and that one's gradient."""

MODES: tuple[Optional[LayerCheckpointing], ...] = (None, "recompute", "offload")

HOST_PIECE_BYTES = 32 * 2**20
"""The smallest piece of an offload host buffer of more than this many bytes (:func:`host_piece_sizes`)."""

HOST_MARGIN_BYTES = 4 * GIB
"""Host memory that offload buffers leave to everything else (the process, the data loaders, the system)."""


def host_piece_sizes(numel: int, element_size: int, piece_bytes: int = HOST_PIECE_BYTES) -> list[int]:
    """Element counts of the pieces of an offload host buffer for ``numel`` elements: each piece's
    byte size a power of two, largest first. Up to ``piece_bytes`` one piece (at most twice the
    bytes needed); beyond, multiples of ``piece_bytes`` (a power of two) by the binary digits of the
    count of ``piece_bytes`` units that covers ``numel`` (less than one unit more than needed).
    torch's pinned-memory allocator rounds every allocation up to a power of two: pieces of such
    sizes waste nothing there."""
    unit = piece_bytes // element_size
    if numel <= unit:
        return [1 << max(numel - 1, 0).bit_length()]
    units = -(-numel // unit)
    return [unit << bit for bit in reversed(range(units.bit_length())) if units >> bit & 1]


def host_bytes(input_bytes: int) -> int:
    """Host memory an offloaded input of ``input_bytes`` holds (its pieces)."""
    return sum(host_piece_sizes(input_bytes, 1))


def host_memory_available() -> Optional[int]:
    """Bytes of host memory new allocations can take without swapping (Linux ``MemAvailable``),
    ``None`` where the system does not say."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class StackMemory:
    """One decoder stack for one batch shape: ``layers`` alike, each saving ``saved_bytes`` (``A``)
    for backward without checkpointing and taking an input of ``input_bytes`` (``I``)."""

    layers: int
    saved_bytes: int
    input_bytes: int


@dataclass(frozen=True)
class CheckpointPlan:
    """A plan of ``checkpointing="auto"``: the mode of every layer (None: not checkpointed), by stack,
    for batches of up to ``tokens`` tokens, and the numbers it was made from (bytes)."""

    modes: tuple[tuple[Optional[LayerCheckpointing], ...], ...]
    tokens: int
    budget_bytes: int
    fixed_bytes: int
    peak_bytes: int

    def count(self, mode: Optional[LayerCheckpointing]) -> int:
        return sum(stack.count(mode) for stack in self.modes)

    @property
    def checkpoint_fraction(self) -> float:
        """The share of the layers whose forward is recomputed in backward (recompute and offload)."""
        total = sum(len(stack) for stack in self.modes)
        return (total - self.count(None)) / total if total else 0.0

    def __str__(self) -> str:
        layers = ", ".join(f"{self.count(mode)} {mode or 'none'}" for mode in MODES)
        return (
            f"lightning_fastft: checkpointing='auto' for up to {self.tokens} tokens a batch: decoder layers "
            f"{layers}; estimated peak {self.peak_bytes / GIB:.2f} GiB of the {self.budget_bytes / GIB:.2f} GiB "
            f"budget (fixed memory {self.fixed_bytes / GIB:.2f} GiB)"
        )


def stack_modes(layers: int, counts: Sequence[int]) -> tuple[Optional[LayerCheckpointing], ...]:
    """The mode of each of ``layers`` layers, bottom first, for ``counts = (none, recompute, offload)``:
    offloaded lowest, then recomputed, then the layers without checkpointing."""
    plain, recomputed, offloaded = counts
    if plain + recomputed + offloaded != layers:
        raise ValueError(f"counts {tuple(counts)} do not add up to {layers} layers")
    return ("offload",) * offloaded + ("recompute",) * recomputed + (None,) * plain


def estimate_peak_bytes(
    stacks: Sequence[StackMemory],
    counts: Sequence[Sequence[int]],
    fixed_bytes: int,
    loss_workspace_bytes: int,
) -> int:
    """The estimated peak (module docstring) with ``counts[s] = (none, recompute, offload)`` layers of
    ``stacks[s]`` placed by :func:`stack_modes`, the stacks running in their order."""
    kept_below = backward_peak = 0
    for stack, stack_counts in zip(stacks, counts):
        saved, hidden = stack.saved_bytes, stack.input_bytes
        plain, recomputed, offloaded = stack_counts
        for number, kept, own in ((offloaded, 0, 2 * saved + hidden), (recomputed, hidden, 2 * saved), (plain, saved, 2 * saved)):
            if number:  # the top layer of the run has the most kept below it
                backward_peak = max(backward_peak, kept_below + (number - 1) * kept + own)
                kept_below += number * kept
    return fixed_bytes + max(kept_below + loss_workspace_bytes, backward_peak)


def plan_checkpointing(
    stacks: Sequence[StackMemory],
    *,
    tokens: int,
    fixed_bytes: int,
    loss_workspace_bytes: int,
    budget_bytes: int,
    offload: bool = True,
    host_budget_bytes: Optional[int] = None,
) -> CheckpointPlan:
    """The fastest plan by the module docstring's rule whose :func:`estimate_peak_bytes` fits ``budget_bytes``.

    Stacks are filled in order of their layers' saved bytes, smallest first: first the count of
    layers without checkpointing (each count tried from the most down: the fit is not monotone in
    it), with every later layer offloaded; then recompute instead of offload, the same way. ``offload=False`` (no CUDA): only none and recompute.
    ``host_budget_bytes`` caps the host memory of the offloaded inputs (:func:`host_bytes` each): the
    layers beyond the cap start recomputed instead of offloaded, and are the first to go without
    checkpointing.

    Raises:
        ValueError: the budget is below the fixed memory, or below the least any plan needs (every
            layer offloaded as far as the host holds them and the others recomputed, or all recomputed
            without ``offload``); the numbers are named.
    """
    counts = [[0, 0, stack.layers] if offload else [0, stack.layers, 0] for stack in stacks]
    host_left = host_budget_bytes
    for stack, stack_counts in zip(stacks, counts):
        if host_left is not None and stack_counts[2]:
            fits = min(stack.layers, max(0, host_left) // host_bytes(stack.input_bytes))
            stack_counts[1:] = [stack.layers - fits, fits]
            host_left -= fits * host_bytes(stack.input_bytes)
    offloaded = sum(stack_counts[2] for stack_counts in counts)
    layers = sum(stack.layers for stack in stacks)
    cheapest = (
        "offloaded (checkpointing='offload')" if offloaded == layers
        else "recomputed (checkpointing='recompute')" if not offloaded
        else f"offloaded as far as host memory holds them ({offloaded} of {layers}) and the rest recomputed"
    )  # fmt: skip

    def peak() -> int:
        return estimate_peak_bytes(stacks, counts, fixed_bytes, loss_workspace_bytes)

    if fixed_bytes > budget_bytes:
        raise ValueError(
            f"memory_budget_gib={budget_bytes / GIB:.2f} GiB is below the fixed memory of training, "
            f"{fixed_bytes / GIB:.2f} GiB (weights, gradients, optimizer states and whatever else is on the device)"
        )
    if peak() > budget_bytes:
        raise ValueError(
            f"memory_budget_gib={budget_bytes / GIB:.2f} GiB is below the {peak() / GIB:.2f} GiB that training "
            f"needs with every decoder layer {cheapest}, of which {fixed_bytes / GIB:.2f} GiB fixed memory; give "
            "a larger budget or smaller batches"
        )
    order = sorted(range(len(stacks)), key=lambda s: stacks[s].saved_bytes)
    # (from, to) count indices: none 0, recompute 1, offload 2
    # the recomputed layers beyond the host's cap go without checkpointing first: they keep I, offloaded ones 0
    phases = ((1, 0), (2, 0), (2, 1)) if offload else ((1, 0),)
    for source, target in phases:
        for s in order:
            available = counts[s][source]
            for moved in range(available, 0, -1):
                counts[s][source] -= moved
                counts[s][target] += moved
                if peak() <= budget_bytes:
                    break
                counts[s][source] += moved
                counts[s][target] -= moved
    return CheckpointPlan(
        modes=tuple(stack_modes(stack.layers, stack_counts) for stack, stack_counts in zip(stacks, counts)),
        tokens=tokens,
        budget_bytes=budget_bytes,
        fixed_bytes=fixed_bytes,
        peak_bytes=peak(),
    )


def _storage_key(tensor: Tensor) -> tuple[torch.device, int]:
    return tensor.device, tensor.untyped_storage().data_ptr()


def saved_activation_bytes(run: Callable[[], Any], exclude: Iterable[Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``run()`` runs with grad
    enabled (one layer's forward), leaving out the storages of ``exclude`` (parameters, inputs
    shared by all layers). A view keeps its whole storage alive and counts as that storage."""
    excluded = {_storage_key(tensor) for tensor in exclude}
    saved: dict[tuple[torch.device, int], int] = {}

    def pack(tensor: Tensor) -> Tensor:
        key = _storage_key(tensor)
        if key not in excluded:
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = run()
    del output
    return sum(saved.values())


def loss_workspace_bytes(model: nn.Module, tokens: int) -> int:
    """The memory of the LM head and loss for a batch of ``tokens`` tokens, for the outermost
    Hugging Face model inside ``model`` (0 without one).

    Fused linear cross-entropy (the ``cross_entropy`` patch): the final norm's input and output and
    the hidden-state gradient (``tokens x hidden`` each), one chunk of logits
    (:data:`~lightning_fastft.kernels.cross_entropy.LOGITS_CHUNK_BYTES` at most), fp32 row losses,
    and the head's weight gradient if it trains. Otherwise the ``tokens x vocab`` logits plus
    :data:`HF_LOSS_BYTES_PER_LOGIT` per logit.
    """
    from lightning_fastft._hf import outermost_hf_model
    from lightning_fastft.kernels.cross_entropy import LOGITS_CHUNK_BYTES
    from lightning_fastft.patching.model import computes_fused_loss

    hf_model = outermost_hf_model(model)
    head = hf_model.get_output_embeddings() if hf_model is not None else None
    if head is None:
        return 0
    vocab, hidden = head.weight.shape
    itemsize = head.weight.element_size()
    if not computes_fused_loss(hf_model):
        return tokens * vocab * (itemsize + HF_LOSS_BYTES_PER_LOGIT)
    head_gradient = head.weight.numel() * itemsize if head.weight.requires_grad else 0
    return 3 * tokens * hidden * itemsize + min(LOGITS_CHUNK_BYTES, tokens * vocab * itemsize) + 4 * tokens + head_gradient


def model_state_bytes(model: nn.Module, device: torch.device) -> int:
    """The memory training needs whatever the activations: on CUDA what is allocated on ``device`` now
    (weights, the batch, anything else), elsewhere the parameters and buffers of ``model``; plus, for
    trainable parameters, the gradients not allocated yet and AdamW's two moments (the parameter's
    size each; counted as not allocated yet, which overcounts after the first optimizer step)."""
    if device.type == "cuda":
        resident = torch.cuda.memory_allocated(device)
    else:
        storages = {_storage_key(t): t.untyped_storage().nbytes() for t in (*model.parameters(), *model.buffers())}
        resident = sum(storages.values())
    trainable = [p for p in model.parameters() if p.requires_grad]
    gradients = sum(p.numel() * p.element_size() for p in trainable if p.grad is None)
    moments = 2 * sum(p.numel() * p.element_size() for p in trainable)
    return resident + gradients + moments


def default_memory_budget(device: torch.device) -> int:
    """The default budget in bytes on ``device``: its free memory plus what PyTorch's caching allocator
    holds (reserved, reusable), minus :data:`DEFAULT_MARGIN_FRACTION` of its total memory.

    Raises:
        ValueError: ``device`` is not a CUDA device (no free-memory reading: give ``memory_budget_gib``).
    """
    if device.type != "cuda":
        raise ValueError(
            f"checkpointing='auto' on a {device.type} device needs memory_budget_gib (the free memory of "
            "CUDA devices only is read for the default budget)"
        )
    free, total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - math.ceil(DEFAULT_MARGIN_FRACTION * total)
