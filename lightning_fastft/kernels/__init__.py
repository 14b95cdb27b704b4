"""Triton kernels with hand-derived backward passes, each beside its PyTorch reference.

One module per op, laid out alike: the public op, its ``<op>_reference``, the Triton kernels
``_<op>_*_kernel``, the ``<op>_forward``/``<op>_backward`` launchers and the autograd Function.
Launch settings come from one policy, :class:`lightning_fastft.kernels._launch.LaunchPolicy`.
"""

from lightning_fastft.kernels.clamped_swiglu import ClampedSwiGLU, clamped_swiglu
from lightning_fastft.kernels.cross_entropy import causal_lm_loss, fused_linear_cross_entropy, shift_labels
from lightning_fastft.kernels.glu import geglu, glu, swiglu
from lightning_fastft.kernels.grouped_gemm import grouped_mm, grouped_mm_weight_grad
from lightning_fastft.kernels.lora import LoRAWeights, lora_linear, lora_mlp, lora_qkv
from lightning_fastft.kernels.moe import ExpertLora, moe_experts
from lightning_fastft.kernels.nf4 import dequantize_4bit
from lightning_fastft.kernels.rms_norm import rms_norm
from lightning_fastft.kernels.rope import rope_qk_

__all__ = [
    "ClampedSwiGLU",
    "ExpertLora",
    "LoRAWeights",
    "causal_lm_loss",
    "clamped_swiglu",
    "dequantize_4bit",
    "fused_linear_cross_entropy",
    "geglu",
    "glu",
    "grouped_mm",
    "grouped_mm_weight_grad",
    "lora_linear",
    "lora_mlp",
    "lora_qkv",
    "moe_experts",
    "rms_norm",
    "rope_qk_",
    "shift_labels",
    "swiglu",
]
