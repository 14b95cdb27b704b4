"""``lightning-fastft``: LightningCLI for :class:`~lightning_fastft.module.CausalLMFineTune`;
``lightning-fastft-grpo`` the same for :class:`~lightning_fastft.rl.GRPOFineTune`.

    lightning-fastft fit --config examples/configs/tiny_llama_lora.yaml
    lightning-fastft fit --config examples/configs/tiny_llama_lora.yaml --trainer.strategy.checkpointing offload
    lightning-fastft predict --config examples/configs/tiny_llama_lora.yaml --ckpt_path last.ckpt
    lightning-fastft-grpo fit --config examples/configs/tiny_llama_grpo.yaml

Importing ``lightning_fastft`` registers the strategy names, so ``trainer.strategy: fastft``
works in YAML, and ``--trainer.strategy.NAME VALUE`` sets one of its options (a registered
strategy name is turned into its ``class_path`` form for that); the class form
(``class_path: lightning_fastft.strategies.FastFTStrategy``) takes the fastft options as
``init_args``. ``data`` is any LightningDataModule given by ``class_path``.
"""

from __future__ import annotations

import inspect
import json
import sys
import typing
from typing import Any, Optional

import lightning.pytorch as pl
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import StrategyRegistry

import lightning_fastft  # noqa: F401  (registers the fastft strategy names)
from lightning_fastft.module import CausalLMFineTune
from lightning_fastft.patching.options import PatchOptions
from lightning_fastft.strategies import FastFTStrategy, FastFTStrategyMixin
from lightning_fastft.strategies.fastft import STRATEGY_NAMES

STRATEGY_OPTION = "--trainer.strategy."


def _type_name(hint: Any) -> str:
    """``bool``, ``Optional[Literal['recompute', 'offload']]``: a type as written in code."""
    return hint.__name__ if typing.get_origin(hint) is None else str(hint).replace("typing.", "")


def fastft_options_help() -> str:
    """The ``--help`` text of the fastft strategy options (``name: type = default`` each, from the signature)."""
    hints = {**typing.get_type_hints(PatchOptions), **typing.get_type_hints(FastFTStrategyMixin.__init__)}
    options = [
        f"{name}: {_type_name(hints[name])} = {parameter.default!r}"
        for name, parameter in inspect.signature(FastFTStrategyMixin.__init__).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    return (
        f"With trainer.strategy one of {', '.join(STRATEGY_NAMES)} (or class_path "
        f"{FastFTStrategy.__module__}.{FastFTStrategy.__name__}), set them with {STRATEGY_OPTION}NAME VALUE "
        f"({STRATEGY_OPTION}help FastFTStrategy describes them): " + "; ".join(options) + "."
    )


def _strategy_probe_args(args: list[str]) -> list[str]:
    """``args`` without the ``--trainer.strategy.NAME [VALUE]`` items and without those that print
    and exit (``--help``, ``--print_config``)."""
    kept, skip_value = [], False
    for arg in args:
        if skip_value:
            skip_value = False
        elif arg.startswith(STRATEGY_OPTION):
            skip_value = "=" not in arg
        elif arg not in ("-h", "--help") and not arg.startswith("--print_config"):
            kept.append(arg)
    return kept


class FastFTCLI(LightningCLI):
    """LightningCLI that lists the fastft strategy options in ``--help`` and accepts
    ``--trainer.strategy.NAME VALUE`` after a strategy given by its registered name."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument_group("fastft strategy options", description=fastft_options_help())

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        given = sys.argv[1:] if args is None else args
        if isinstance(given, (dict, Namespace)) or not any(str(arg).startswith(STRATEGY_OPTION) for arg in given):
            return super().parse_arguments(parser, args)
        self.config = parser.parse_args(strategy_names_as_class_paths(parser, list(given)))


def strategy_names_as_class_paths(parser: LightningArgumentParser, args: list[str]) -> list[str]:
    """``args`` with ``--trainer.strategy={class_path, init_args}`` put before the first
    ``--trainer.strategy.NAME`` option when the strategy parsed without those options is a
    registered name (jsonargparse sets options on class paths only)."""
    exit_on_error, parser.exit_on_error = parser.exit_on_error, False
    try:
        config = parser.parse_args(_strategy_probe_args(args))
    except ArgumentError:
        return args  # the full parse reports the error
    finally:
        parser.exit_on_error = exit_on_error
    trainer = config[config.subcommand].trainer if config.get("subcommand") else config.trainer
    name = trainer.strategy
    if not isinstance(name, str) or name not in StrategyRegistry:
        return args
    entry = StrategyRegistry[name]
    class_path = f"{entry['strategy'].__module__}.{entry['strategy'].__qualname__}"
    spec = json.dumps({"class_path": class_path, "init_args": entry["init_params"]})
    first = next(i for i, arg in enumerate(args) if arg.startswith(STRATEGY_OPTION))
    return [*args[:first], f"--trainer.strategy={spec}", *args[first:]]


def build_cli(
    args: Optional[list[str]] = None,
    run: bool = True,
    model_class: type[pl.LightningModule] = CausalLMFineTune,
    **cli_kwargs: Any,
) -> LightningCLI:
    """The CLI object (runs the subcommand in ``args`` unless ``run=False``) for ``model_class``."""
    return FastFTCLI(
        model_class,
        pl.LightningDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        **cli_kwargs,
    )


def main(args: Optional[list[str]] = None) -> None:
    """Console entry point ``lightning-fastft``: supervised fine-tuning."""
    build_cli(args)


def grpo_main(args: Optional[list[str]] = None) -> None:
    """Console entry point ``lightning-fastft-grpo``: GRPO (:class:`~lightning_fastft.rl.GRPOFineTune`)."""
    from lightning_fastft.rl import GRPOFineTune

    build_cli(args, model_class=GRPOFineTune)


if __name__ == "__main__":
    main()
