"""The tested window: pyproject declares it, the two lock files sit at its ends, import warns outside it."""

import warnings
from pathlib import Path

from importlib import metadata

from packaging.requirements import Requirement

from lightning_fastft import _versions

ROOT = Path(__file__).resolve().parents[1]


def pins(lock: str) -> dict[str, str]:
    """``{name: version}`` of a ``name==version`` constraints file."""
    lines = (ROOT / lock).read_text().splitlines()
    parsed = (Requirement(line) for line in lines if line and not line.startswith("#"))
    return {req.name.lower().replace("_", "-"): str(req.specifier).removeprefix("==") for req in parsed}


def test_window_has_both_ends_and_the_installed_versions_are_inside():
    window = _versions.tested_window()
    assert set(window) == set(_versions.WATCHED)
    for requirement in window.values():
        assert {spec.operator for spec in requirement.specifier} == {">=", "<"}
    assert _versions.untested_versions() == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _versions.warn_untested_versions()


def test_lock_files_sit_at_the_ends_of_the_window():
    latest, oldest = pins("constraints.txt"), pins("constraints-oldest.txt")
    for name, requirement in _versions.tested_window().items():
        lower = next(spec.version for spec in requirement.specifier if spec.operator == ">=")
        assert oldest[name].startswith(lower), (name, oldest[name])
    for line in metadata.requires("lightning_fastft"):  # every declared dependency, dev extra included
        requirement = Requirement(line)
        name = requirement.name.lower().replace("_", "-")
        for lock in (latest, oldest):
            assert requirement.specifier.contains(lock[name], prereleases=True), (name, lock[name])


def test_versions_outside_the_window_warn_once_at_import(monkeypatch):
    monkeypatch.setattr(_versions.metadata, "version", lambda name: "99.0.0")
    assert [line.split(" is ")[0] for line in _versions.untested_versions()] == ["transformers 99.0.0", "peft 99.0.0"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _versions.warn_untested_versions()
    assert len(caught) == 1
    window = _versions.tested_window()["transformers"]
    assert f"transformers 99.0.0 is outside the tested window transformers{window.specifier}" in str(caught[0].message)
