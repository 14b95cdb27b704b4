"""``lightning-fastft``: LightningCLI for :class:`~lightning_fastft.module.CausalLMFineTune`.

    lightning-fastft fit --config examples/configs/tiny_llama_lora.yaml

Importing ``lightning_fastft`` registers the strategy names, so ``trainer.strategy: fastft``
works in YAML; the class form (``class_path: lightning_fastft.strategies.FastFTStrategy``) takes
the fastft options as ``init_args``. ``data`` is any LightningDataModule given by ``class_path``.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

import lightning_fastft  # noqa: F401  (registers the fastft strategy names)
from lightning_fastft.module import CausalLMFineTune


def build_cli(args: Optional[list[str]] = None, run: bool = True, **cli_kwargs: Any) -> LightningCLI:
    """The CLI object (runs the subcommand in ``args`` unless ``run=False``)."""
    return LightningCLI(
        CausalLMFineTune,
        pl.LightningDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        **cli_kwargs,
    )


def main(args: Optional[list[str]] = None) -> None:
    """Console entry point."""
    build_cli(args)


if __name__ == "__main__":
    main()
