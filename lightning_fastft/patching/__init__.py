"""Model patching: swap HF modules' forwards (per instance) for the fast kernels."""

from lightning_fastft.patching.model import ModelPatchReport, PatchReport, patch_model

__all__ = ["ModelPatchReport", "PatchReport", "patch_model"]
