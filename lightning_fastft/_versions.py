"""The tested window of the Hugging Face stack, read from the package's own requirements.

``pyproject.toml`` is the one place the window is written: its ``transformers`` and ``peft``
requirements are the oldest and newest versions CI tests (the lock file pins the newest, the
oldest are tested by ``scripts/test.sh`` too). Patching replaces Hugging Face forwards whose
arguments move between releases, so a version outside that window gets one warning at import.
Nothing here imports transformers or peft: only their installed metadata is read.
"""

from __future__ import annotations

import warnings
from importlib import metadata

from packaging.requirements import Requirement

WATCHED = ("transformers", "peft")
"""Packages whose forwards or module layout the patches depend on."""


def tested_window() -> dict[str, Requirement]:
    """``{name: requirement}`` for :data:`WATCHED`, as this installed package declares them."""
    try:
        requirements = metadata.requires("lightning_fastft") or []
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return {}
    parsed = (Requirement(line) for line in requirements)
    return {req.name: req for req in parsed if req.name in WATCHED and req.marker is None}


def untested_versions() -> list[str]:
    """One line per watched package installed at a version outside the tested window."""
    lines = []
    for name, requirement in tested_window().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # a missing hard dependency fails loudly where it is imported
        if not requirement.specifier.contains(installed, prereleases=True):
            lines.append(f"{name} {installed} is outside the tested window {name}{requirement.specifier}")
    return lines


def warn_untested_versions() -> None:
    """Warn once (at import) when transformers or peft is outside the tested window."""
    lines = untested_versions()
    if lines:
        warnings.warn(
            "lightning_fastft: " + "; ".join(lines) + ". Patched forwards are checked against the "
            "Hugging Face signatures they replace and fall back to Hugging Face's code where those "
            "differ; install a tested version (pip install -c constraints.txt) to be sure.",
            stacklevel=3,
        )
