"""lightning_fastft as an Axolotl plugin: one line in an Axolotl YAML::

    plugins:
      - lightning_fastft.integrations.axolotl.FastFTPlugin
    fastft_checkpointing: recompute     # optional: see FastFTArgs for every key

Supported Axolotl versions: :data:`SUPPORTED_AXOLOTL` (tested in CI with the version pinned in
``constraints-axolotl.txt``; another version gets one warning when the plugin loads). Axolotl is
not a dependency of lightning_fastft: this module imports it only when ``FastFTPlugin`` is first
looked up (Axolotl's ``plugins:`` loader does that), and ``import lightning_fastft`` never does.

What each hook does, in the order Axolotl calls them (``axolotl/loaders/model.py``
``ModelLoader.load``, ``core/builders``, ``train.py``):

* ``register`` (the raw YAML, before Axolotl validates it): refuses Axolotl's Liger and
  Cut-Cross-Entropy plugins, ``liger_*`` / ``cut_cross_entropy`` keys and the ``lora_*_kernel``
  options set true (they replace the same forwards), and sets the ``lora_*_kernel`` options left
  unset to false so that Axolotl does not switch its own LoRA kernels on for LoRA/QLoRA runs;
  with ``fastft_checkpointing``, Axolotl's ``gradient_checkpointing`` is turned off (with a
  warning) and ``activation_offloading`` refused; with ``fastft_packing``, ``sample_packing`` is refused.
* ``pre_model_load``: the same checks on the validated config.
* ``post_model_build``: the kernel patches (RMSNorm, RoPE, SwiGLU/GeGLU, fused linear
  cross-entropy), per module instance, on the freshly built model
  (:func:`~lightning_fastft.patching.model.patch_model`).
* ``post_lora_load``: the fused LoRA QKV / O / MLP kernels on the PEFT model.
* ``post_model_load``: lightning_fastft's activation checkpointing of the decoder layers
  (:func:`~lightning_fastft.integrations.hf.prepare_model`, which also keeps Hugging Face's
  gradient checkpointing from being added on top) and the patch report (logged).
* ``get_collator_cls_and_kwargs`` (``fastft_packing``): :class:`PackedBatchCollator`, varlen
  packing of each micro-batch into rows of ``sequence_len`` tokens.
* ``create_optimizer`` (``fastft_optimizer: adamw_8bit``): the Trainer's AdamW as bitsandbytes'
  8-bit AdamW (:func:`~lightning_fastft.training.optim.to_8bit_adamw`). Axolotl 0.19 never calls
  this hook, so ``post_trainer_create`` hands the optimizer to the trainer itself.
* ``add_callbacks_post_trainer``: :class:`~lightning_fastft.integrations.hf.FastFTCallback`
  (tokens/s, MFU, peak memory in every training log), ahead of the reporting callbacks.
* ``post_train`` (``fastft_export``): a merged 16-bit checkpoint (``merged``) or a GGUF file
  (``gguf``) under ``fastft_export_dir`` (default ``<output_dir>/fastft_export``), once, on the
  main process.

Token-exact gradient accumulation comes from the Trainer's ``num_items_in_batch``, which the
patched causal-LM forward hands to the fused cross-entropy (see :mod:`lightning_fastft.integrations.hf`).

Licence: Axolotl's ``src/axolotl/integrations/`` (``BasePlugin``) is under the Axolotl Community
License Agreement, the rest of Axolotl under Apache-2.0. This module contains no Axolotl code; it
subclasses ``BasePlugin`` at run time, in the user's Axolotl installation.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, model_validator

from lightning_fastft.patching.options import CHECKPOINTING, PatchOptions
from lightning_fastft.training.optim import OPTIMIZER_CHOICES

__all__ = ["SUPPORTED_AXOLOTL", "FastFTArgs", "PackedBatchCollator", "check_config"]  # and FastFTPlugin, built on first access

SUPPORTED_AXOLOTL = ">=0.19,<0.20"
"""The Axolotl releases the plugin is written and tested against (its hook names and call order)."""

LOG = logging.getLogger(__name__)

EXPORT_FORMATS = ("merged", "gguf")

_LORA_KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")
_CONFLICTING_PLUGINS = ("LigerPlugin", "CutCrossEntropyPlugin")


class FastFTArgs(BaseModel):
    """The plugin's YAML keys (Axolotl merges this model into its config schema).

    Args:
        fastft_kernels: the RMSNorm, RoPE, SwiGLU/GeGLU and fused linear cross-entropy kernels.
        fastft_fused_lora: the fused LoRA QKV / O / MLP kernels (LoRA/QLoRA adapters).
        fastft_checkpointing: lightning_fastft's activation checkpointing of the decoder layers,
            one of the ``checkpointing`` values of
            :class:`~lightning_fastft.patching.options.PatchOptions` or ``none``; replaces
            Axolotl's ``gradient_checkpointing``.
        fastft_checkpoint_fraction: share in (0, 1] of the decoder layers checkpointed.
        fastft_packing: pack each micro-batch's samples into rows of ``sequence_len`` tokens kept
            apart by varlen attention (instead of Axolotl's ``sample_packing``).
        fastft_optimizer: ``adamw_8bit``: the Trainer's AdamW as bitsandbytes' 8-bit AdamW.
        fastft_export: after training, ``merged`` (16-bit Hugging Face checkpoint, LoRA merged)
            or ``gguf`` (llama.cpp file).
        fastft_export_dir: where the export goes; default ``<output_dir>/fastft_export``.
        fastft_gguf_dtype: the GGUF tensor type (see :func:`~lightning_fastft.export.gguf.export_gguf`).
    """

    fastft_kernels: bool = True
    fastft_fused_lora: bool = True
    fastft_checkpointing: Literal[(*CHECKPOINTING, "none")] | None = None  # type: ignore[valid-type]
    fastft_checkpoint_fraction: float = 1.0
    fastft_packing: bool = False
    fastft_optimizer: Literal[OPTIMIZER_CHOICES] | None = None  # type: ignore[valid-type]
    fastft_export: Literal[EXPORT_FORMATS] | None = None  # type: ignore[valid-type]
    fastft_export_dir: str | None = None
    fastft_gguf_dtype: str = "f16"

    @model_validator(mode="before")
    @classmethod
    def _check_combination(cls, data: Any) -> Any:
        """:func:`check_config` on the whole Axolotl config (this model is merged into its schema)."""
        if isinstance(data, dict):
            check_config(data)
        return data


def _fastft_options(cfg: Any) -> dict[str, Any]:
    """The :class:`~lightning_fastft.patching.options.PatchOptions` keywords the config asks for."""
    kernels = _get(cfg, "fastft_kernels", True)
    checkpointing = _get(cfg, "fastft_checkpointing")
    return dict(
        rms_norm=kernels,
        rope=kernels,
        mlp=kernels,
        cross_entropy=kernels,
        fused_lora=_get(cfg, "fastft_fused_lora", True),
        checkpointing=None if checkpointing in (None, "none") else checkpointing,
        checkpoint_fraction=_get(cfg, "fastft_checkpoint_fraction", 1.0),
    )


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    value = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
    return default if value is None else value


def check_config(cfg: Any) -> None:
    """Raise ``ValueError`` naming every Axolotl setting that cannot run with the plugin.

    Refused: Axolotl's Liger or Cut-Cross-Entropy plugins and their ``liger_*`` /
    ``cut_cross_entropy`` keys (they replace the same forwards and losses), any ``lora_*_kernel``
    set true (Axolotl's own LoRA kernels), ``activation_offloading`` with ``fastft_checkpointing``,
    ``sample_packing`` with ``fastft_packing``, and ``fastft_optimizer`` with another ``optimizer``
    than AdamW or with DeepSpeed/FSDP (which build the optimizer themselves).
    """
    problems = []
    try:
        PatchOptions(**_fastft_options(cfg))
    except (TypeError, ValueError) as error:
        problems.append(f"fastft_* options: {error}")
    plugins = [str(name) for name in (_get(cfg, "plugins") or [])]
    for name in plugins:
        if name.rsplit(".", 1)[-1] in _CONFLICTING_PLUGINS:
            problems.append(f"plugin {name} (it patches the same modules and loss as lightning_fastft)")
    keys = cfg.keys() if hasattr(cfg, "keys") else ()
    for key in sorted(keys):
        if (key.startswith("liger_") or key == "cut_cross_entropy") and _get(cfg, key):
            problems.append(f"{key}: true")
    for key in _LORA_KERNEL_KEYS:
        if _get(cfg, key):
            problems.append(f"{key}: true (Axolotl's LoRA kernels; lightning_fastft's fused LoRA is fastft_fused_lora)")
    checkpointing = _get(cfg, "fastft_checkpointing")
    if checkpointing not in (None, "none") and _get(cfg, "activation_offloading"):
        problems.append("activation_offloading together with fastft_checkpointing (use fastft_checkpointing: offload)")
    if _get(cfg, "fastft_packing") and _get(cfg, "sample_packing"):
        problems.append("sample_packing together with fastft_packing (choose one packing)")
    if _get(cfg, "fastft_optimizer"):
        optimizer = _get(cfg, "optimizer")
        if optimizer is not None and not str(optimizer).startswith("adamw_torch"):
            problems.append(f"optimizer: {optimizer} with fastft_optimizer (which converts AdamW: adamw_torch*)")
        if _get(cfg, "deepspeed") or _get(cfg, "fsdp_config") or _get(cfg, "fsdp"):
            problems.append("fastft_optimizer with DeepSpeed/FSDP (use Axolotl's optimizer: adamw_bnb_8bit)")
    if problems:
        raise ValueError(
            "lightning_fastft.integrations.axolotl.FastFTPlugin cannot run with: " + "; ".join(problems) + "."
        )


def _take_over_config(cfg: Any) -> None:
    """Settings the plugin replaces: Axolotl's gradient checkpointing (by ``fastft_checkpointing``)
    and the auto-enabled ``lora_*_kernel`` options (by the fused LoRA kernels)."""
    if _get(cfg, "fastft_checkpointing") not in (None, "none") and _get(cfg, "gradient_checkpointing"):
        warnings.warn(
            "lightning_fastft: gradient_checkpointing is turned off; the decoder layers are checkpointed by "
            f"fastft_checkpointing={_get(cfg, 'fastft_checkpointing')!r} instead.",
            stacklevel=3,
        )
        cfg["gradient_checkpointing"] = False
    for key in _LORA_KERNEL_KEYS:
        if cfg.get(key) is None:
            cfg[key] = False  # Axolotl switches unset ones on for LoRA/QLoRA


class PackedBatchCollator:
    """Axolotl's collator interface (``collator(tokenizer, **kwargs)``) over
    :class:`~lightning_fastft.data.packing.PackedCollator`: each micro-batch's samples packed into
    rows of ``max_seq_len`` tokens (positions restart per sample; varlen boundaries for the
    patched attention); rows padded to ``pad_to_multiple_of`` with the tokenizer's pad token.

    ``padding`` and ``return_tensors`` (Axolotl's defaults for its own collators) must be the
    values the packed collator produces anyway: ``True``/``"longest"`` and ``"pt"``.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_seq_len: int,
        pad_to_multiple_of: int | None = None,
        padding: Any = True,
        return_tensors: str = "pt",
        split_long: bool = False,
    ) -> None:
        from lightning_fastft.data.packing import PackedCollator

        if padding not in (True, "longest"):
            raise ValueError(f"PackedBatchCollator pads every row to the longest; got padding={padding!r}")
        if return_tensors != "pt":
            raise ValueError(f"PackedBatchCollator returns torch tensors; got return_tensors={return_tensors!r}")
        pad_token_id = tokenizer.pad_token_id
        if pad_token_id is None:
            raise ValueError("PackedBatchCollator: the tokenizer has no pad token (set special_tokens.pad_token)")
        self.collator = PackedCollator(
            max_seq_len,
            pad_token_id=pad_token_id,
            pad_to_multiple_of=pad_to_multiple_of or 1,
            split_long=split_long,
        )

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return self.collator(features)


def _build_plugin_class() -> type:
    """``FastFTPlugin``: built on first access (imports Axolotl), warning outside :data:`SUPPORTED_AXOLOTL`."""
    from importlib import metadata

    from packaging.specifiers import SpecifierSet

    try:
        from axolotl.integrations.base import BasePlugin
    except ImportError as error:
        raise ImportError(
            f"lightning_fastft.integrations.axolotl.FastFTPlugin is an Axolotl plugin and needs axolotl{SUPPORTED_AXOLOTL} "
            f"installed ({error})"
        ) from error

    version = metadata.version("axolotl")
    if not SpecifierSet(SUPPORTED_AXOLOTL).contains(version, prereleases=True):
        warnings.warn(
            f"lightning_fastft: axolotl {version} is outside the supported versions {SUPPORTED_AXOLOTL}; "
            "its plugin hooks may be named or called differently.",
            stacklevel=3,
        )

    class FastFTPlugin(BasePlugin):
        """The lightning_fastft Axolotl plugin: the hooks are described in :mod:`lightning_fastft.integrations.axolotl`."""

        def __init__(self) -> None:
            super().__init__()
            self.patch_report = None
            self.callback = None
            self.optimizer = None
            self.exported: Path | None = None

        def get_input_args(self) -> str:
            return f"{__name__}.FastFTArgs"

        def register(self, cfg) -> None:
            check_config(cfg)
            _take_over_config(cfg)

        def pre_model_load(self, cfg) -> None:
            check_config(cfg)
            _take_over_config(cfg)

        def post_model_build(self, cfg, model) -> None:
            from lightning_fastft.patching.model import patch_model

            options = _fastft_options(cfg)
            # fused LoRA once the adapters exist (post_lora_load), checkpointing last (post_model_load)
            options.update(fused_lora=False, checkpointing=None, checkpoint_fraction=1.0)
            self.patch_report = patch_model(model, **options)

        def post_lora_load(self, cfg, model) -> None:
            from lightning_fastft.patching.model import patch_model

            options = _fastft_options(cfg)
            if _get(cfg, "adapter") and options["fused_lora"]:
                options.update(checkpointing=None, checkpoint_fraction=1.0)  # post_model_load's
                self.patch_report = patch_model(model, **options)

        def post_model_load(self, cfg, model) -> None:
            from lightning_fastft.integrations.hf import patch_report, prepare_model

            prepare_model(model, **_fastft_options(cfg))  # the patches above stay; adds the checkpointing
            self.patch_report = patch_report(model)
            LOG.info("%s", self.patch_report)

        def get_collator_cls_and_kwargs(self, cfg, is_eval: bool = False):
            if not _get(cfg, "fastft_packing"):
                return None
            sequence_len = _get(cfg, "eval_sequence_len") if is_eval else None
            return PackedBatchCollator, {"max_seq_len": sequence_len or _get(cfg, "sequence_len")}

        def create_optimizer(self, cfg, trainer):
            if _get(cfg, "fastft_optimizer") is None:
                return None
            if self.optimizer is None:
                from transformers import Trainer

                from lightning_fastft.training.optim import (
                    has_adamw_update,
                    to_8bit_adamw,
                )

                base = Trainer.create_optimizer(trainer)  # the Trainer's own AdamW, its parameter groups
                if not has_adamw_update(base):
                    raise ValueError(
                        f"fastft_optimizer={_get(cfg, 'fastft_optimizer')!r} converts AdamW; the Trainer built "
                        f"{type(base).__qualname__} (optimizer: {_get(cfg, 'optimizer')})"
                    )
                self.optimizer = to_8bit_adamw(base)
                trainer.optimizer = self.optimizer
            return self.optimizer

        def post_trainer_create(self, cfg, trainer) -> None:
            if _get(cfg, "fastft_optimizer") is not None:
                trainer.optimizer = self.create_optimizer(cfg, trainer)
                LOG.info("lightning_fastft: optimizer %s", type(trainer.optimizer).__qualname__)

        def add_callbacks_post_trainer(self, cfg, trainer) -> list:
            from lightning_fastft.integrations.hf import FastFTCallback

            self.callback = FastFTCallback()
            self.callback.attach(trainer)  # first, so the reporting callbacks get its metrics
            return []

        def post_train(self, cfg, model) -> None:
            export = _get(cfg, "fastft_export")
            if export is None or self.exported is not None:
                return  # Axolotl calls post_train twice (after trainer.train and after saving)
            from axolotl.utils.distributed import is_main_process

            if not is_main_process():
                return
            from axolotl.loaders import load_tokenizer

            out_dir = Path(_get(cfg, "fastft_export_dir") or Path(_get(cfg, "output_dir")) / "fastft_export")
            tokenizer = load_tokenizer(cfg)
            if export == "merged":
                from lightning_fastft.export import merge_and_save

                merge_and_save(model, out_dir, tokenizer=tokenizer)
                self.exported = out_dir
            else:
                from lightning_fastft.export import export_gguf

                dtype = _get(cfg, "fastft_gguf_dtype", "f16")
                self.exported = export_gguf(
                    model, out_dir / f"model-{dtype}.gguf", dtype=dtype, tokenizer=tokenizer, overwrite=True
                )
            LOG.info("lightning_fastft: exported %s to %s", export, self.exported)

    FastFTPlugin.__module__ = __name__
    FastFTPlugin.__qualname__ = "FastFTPlugin"
    return FastFTPlugin


def __getattr__(name: str) -> Any:
    if name == "FastFTPlugin":
        plugin_class = globals()["FastFTPlugin"] = _build_plugin_class()
        return plugin_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
