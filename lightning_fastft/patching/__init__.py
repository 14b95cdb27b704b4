"""Model patching: swap HF modules' forwards (per instance) for the fast kernels.

:mod:`.options` (the patch options) is light; the rest imports transformers and the kernels, so
it loads on first attribute access.
"""

import importlib
from typing import Any

from lightning_fastft.patching.options import PatchOptions

_LAZY = {"ModelPatchReport": "model", "PatchReport": "model", "patch_model": "model"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"lightning_fastft.patching.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PatchOptions", *_LAZY]
