"""Model patching: swap HF modules' forwards (per instance) for the fast kernels.

Importing this package registers the ``"fastft_varlen"`` attention implementation with
transformers' ``AttentionInterface`` (an extension point, not a class patch).
"""

from lightning_fastft.patching.model import ModelPatchReport, PatchReport, patch_model
from lightning_fastft.patching.offload import apply_activation_checkpointing, remove_activation_checkpointing
from lightning_fastft.patching.varlen import use_varlen_attention

__all__ = [
    "ModelPatchReport",
    "PatchReport",
    "apply_activation_checkpointing",
    "patch_model",
    "remove_activation_checkpointing",
    "use_varlen_attention",
]
