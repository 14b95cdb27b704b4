"""Settings declared once as frozen dataclasses and taken as keyword arguments by the functions
and classes that use them: :func:`takes_fields` lists the fields in a signature (for LightningCLI,
``--help``, ``inspect``), :func:`pop_fields` builds a settings object from keyword arguments."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from typing import Any, TypeVar

Settings = TypeVar("Settings")


def pop_fields(cls: type[Settings], options: dict[str, Any]) -> Settings:
    """A ``cls`` from the entries of ``options`` named like its fields (removed from ``options``)."""
    return cls(**{field.name: options.pop(field.name) for field in dataclasses.fields(cls) if field.name in options})


def takes_fields(*classes: type) -> Callable[[Callable], Callable]:
    """Decorator: declare the fields of the dataclasses ``classes`` as keyword-only parameters in the
    signature of a function that takes them through ``**options`` (a ``**`` catch-all of another
    name stays, after them)."""

    def declare(function: Callable) -> Callable:
        signature = inspect.signature(function)
        parameters = list(signature.parameters.values())
        fields = [
            inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default, annotation=hint)
            for cls in classes
            for field, hint in ((f, typing.get_type_hints(cls)[f.name]) for f in dataclasses.fields(cls))
        ]
        positional = [p for p in parameters if p.kind not in (p.KEYWORD_ONLY, p.VAR_KEYWORD)]
        keyword_only = [p for p in parameters if p.kind is p.KEYWORD_ONLY]
        catch_all = [p for p in parameters if p.kind is p.VAR_KEYWORD and p.name != "options"]
        function.__signature__ = signature.replace(parameters=positional + fields + keyword_only + catch_all)
        return function

    return declare
