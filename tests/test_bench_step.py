"""Smoke test of benchmarks/bench_step.py (HF / Liger / Unsloth / fastft, one process each, the same
saved weights) on the tiny config on the CPU: the parent saves once, every variant loads those files,
and the table has ratios, the same first loss and the auto plan."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_step.py"


@pytest.mark.subprocess
@pytest.mark.slow
def test_variants_load_the_same_saved_weights_and_start_from_the_same_loss(tmp_path):
    out = tmp_path / "step.json"
    command = [sys.executable, str(BENCH), "--shape", "tiny", "--device", "cpu", "--batch", "2", "--seq-len", "24",
               "--variants", "hf", "fastft", "fastft_auto80", "fastft_auto_unsloth", "--warmup", "1", "--steps", "1",
               "--weights", str(tmp_path), "--out", str(out)]  # fmt: skip
    subprocess.run(command, check=True, timeout=600, capture_output=True)
    assert (tmp_path / "fastft_bench_tiny_all" / "model.safetensors").exists()
    rows = {row["variant"]: row for row in json.loads(out.read_text())["results"]}
    for name in ("hf", "fastft", "fastft_auto80"):
        assert rows[name]["status"] == "ok", rows[name]
        assert len(rows[name]["losses"]) == 2
    # B = 0 at LoRA init: the first loss is the saved base model's for every variant
    assert rows["fastft"]["first_loss"] == pytest.approx(rows["hf"]["first_loss"], rel=1e-2)
    assert rows["fastft_auto80"]["first_loss"] == pytest.approx(rows["hf"]["first_loss"], rel=1e-2)
    assert rows["fastft"]["vs_hf"] == pytest.approx(rows["fastft"]["tokens_per_sec"] / rows["hf"]["tokens_per_sec"])
    assert rows["fastft_auto80"]["plan"] == "2/0/0"  # 80 GiB: no layer checkpointed
    assert rows["fastft_auto_unsloth"]["status"] == "skipped: no unsloth peak"
    assert "| none | 2 | fastft_auto80 | ok |" in out.with_suffix(".md").read_text()
