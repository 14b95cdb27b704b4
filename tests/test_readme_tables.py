"""README.md's result tables are generated from benchmarks/results/ by benchmarks/readme_tables.py."""

import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
readme_tables = load_script(ROOT / "benchmarks" / "readme_tables.py")


def test_readme_tables_match_the_result_files():
    changes = readme_tables.diff(ROOT / "README.md", ROOT / "benchmarks" / "results")
    if changes:
        pytest.fail(f"README.md is out of date; run `{readme_tables.GENERATOR}`:\n{changes}")


def test_check_mode_reports_a_changed_result_and_the_generator_fixes_it(tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results, ignore=shutil.ignore_patterns("archive", "*.png"))
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    run = json.loads((results / "train_partE.json").read_text())
    hf = next(row for row in run["results"] if row["variant"] == "hf")
    hf["tokens_per_sec"] = 1234.0
    (results / "train_partE.json").write_text(json.dumps(run))
    argv = ["--readme", str(readme), "--results", str(results)]

    assert readme_tables.main([*argv, "--check"]) == 1
    assert "+| 8B QLoRA seq 16384 (`--part E`) tok/s | 1234 |" in capsys.readouterr().out
    assert readme_tables.main(argv) == 0
    assert readme_tables.main([*argv, "--check"]) == 0
    text = readme.read_text()
    assert text.count("<!-- END generated: train -->") == 1 and "| 1234 |" in text
    assert text.split("<!-- BEGIN generated: train")[0] == (ROOT / "README.md").read_text().split("<!-- BEGIN generated: train")[0]


def test_every_result_file_the_readme_names_exists():
    names = {file for _, file, *_ in readme_tables.TRAIN_ROWS} | set(readme_tables.MAX_CONTEXT_FILES)
    results = ROOT / "benchmarks" / "results"
    assert all((results / name).is_file() for name in names)
    section = (ROOT / "README.md").read_text().split("## Results on one H100")[1].split("\n## ")[0]
    named = set(re.findall(r"[\w./-]+\.(?:md|json|png)\b", section))
    assert "archive/2026-11-23/train_partA.md" in named
    for path in named:  # relative to the repository or to benchmarks/results/
        assert (ROOT / path).is_file() or (results / path).is_file(), path
