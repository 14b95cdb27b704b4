"""lightning_fastft: fast, memory-lean LLM fine-tuning for PyTorch Lightning.

Importing the package registers the ``"fastft"``, ``"fastft_ddp"``, ``"fastft_ddp_spawn"`` and
``"fastft_fsdp"`` strategy names, so ``Trainer(strategy="fastft")`` works. The rest of the public
API (which imports transformers, peft, bitsandbytes) loads on first attribute access.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

from lightning_fastft._versions import warn_untested_versions  # noqa: E402

warn_untested_versions()

from lightning_fastft.callbacks import FastFT, FastFTMetrics  # noqa: E402
from lightning_fastft.strategies import (  # noqa: E402
    FastFTDDPStrategy,
    FastFTFSDPStrategy,
    FastFTStrategy,
    register_strategies,
)

register_strategies()

_LAZY = {
    "ActivationCheckpointing": "lightning_fastft.callbacks.offload",
    "ActivationOffload": "lightning_fastft.callbacks.offload",
    "CausalLMFineTune": "lightning_fastft.module",
    "FastFTCallback": "lightning_fastft.integrations.hf",
    "FusedLinearGRPOLoss": "lightning_fastft.rl.grpo",
    "GRPOFineTune": "lightning_fastft.rl.module",
    "PackedCollator": "lightning_fastft.data.packing",
    "PaddedCollator": "lightning_fastft.data.packing",
    "PatchOptions": "lightning_fastft.patching.options",
    "PatchReport": "lightning_fastft.patching.model",
    "apply_activation_checkpointing": "lightning_fastft.training.checkpointing",
    "apply_cuda_graphs": "lightning_fastft.training.cuda_graphs",
    "chunked_logprobs": "lightning_fastft.rl.logprobs",
    "cuda_graphs_of": "lightning_fastft.training.cuda_graphs",
    "export_gguf": "lightning_fastft.export.gguf",
    "load_qlora": "lightning_fastft.qlora",
    "merge_and_save": "lightning_fastft.export.merged",
    "pack_dataset": "lightning_fastft.data.packing",
    "pack_sequences": "lightning_fastft.data.packing",
    "patch_model": "lightning_fastft.patching.model",
    "prepare_model": "lightning_fastft.integrations.hf",
    "prepare_qlora": "lightning_fastft.qlora",
    "token_utilisation": "lightning_fastft.data.packing",
    "use_varlen_attention": "lightning_fastft.attention",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FastFT",
    "FastFTDDPStrategy",
    "FastFTFSDPStrategy",
    "FastFTMetrics",
    "FastFTStrategy",
    "register_strategies",
    *_LAZY,
]
