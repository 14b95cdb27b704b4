"""Smoke test of benchmarks/bench_step.py (HF / Liger / Unsloth / fastft, one process each, the same
saved weights) on the tiny config on the CPU: the parent saves once, every variant loads those files,
and the table has ratios, the same first loss and the auto plan."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_script

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_step.py"


def test_rounds_pool_their_timed_steps():
    bench = load_script(BENCH)

    def run(times, peak):
        return {"status": "ok", "step_times": times, "step_s": sorted(times[1:])[1], "peak_gib": peak, "reserved_gib": peak}

    first = bench.pool_rounds(None, run([9.0, 1.0, 2.0, 3.0], 5.0), warmup=1, tokens=12)
    pooled = bench.pool_rounds(first, run([9.0, 4.0, 5.0, 6.0], 4.0), warmup=1, tokens=12)
    assert pooled["timed_step_times"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] and pooled["round_step_s"] == [2.0, 5.0]
    assert pooled["step_s"] == 3.5 and pooled["tokens_per_sec"] == 12 / 3.5 and pooled["peak_gib"] == 5.0
    failed = {"status": "error: boom"}
    assert bench.pool_rounds(pooled, failed, warmup=1, tokens=12) is failed  # a round that failed stands
    assert bench.pool_rounds(failed, run([9.0, 1.0, 2.0, 3.0], 5.0), warmup=1, tokens=12) is failed


@pytest.mark.subprocess
@pytest.mark.slow
def test_variants_load_the_same_saved_weights_and_start_from_the_same_loss(tmp_path):
    out = tmp_path / "step.json"
    command = [sys.executable, str(BENCH), "--shape", "tiny", "--device", "cpu", "--batch", "2", "--seq-len", "24",
               "--variants", "hf", "fastft", "fastft_auto80", "fastft_auto_unsloth", "--warmup", "1", "--steps", "1",
               "--rounds", "2", "--weights", str(tmp_path), "--out", str(out)]  # fmt: skip
    subprocess.run(command, check=True, timeout=600, capture_output=True)
    assert (tmp_path / "fastft_bench_tiny_all" / "model.safetensors").exists()
    rows = {row["variant"]: row for row in json.loads(out.read_text())["results"]}
    for name in ("hf", "fastft", "fastft_auto80"):
        assert rows[name]["status"] == "ok", rows[name]
        assert len(rows[name]["losses"]) == 2
        assert len(rows[name]["round_step_s"]) == 2 and len(rows[name]["timed_step_times"]) == 2  # two rounds, pooled
    # B = 0 at LoRA init: the first loss is the saved base model's for every variant
    assert rows["fastft"]["first_loss"] == pytest.approx(rows["hf"]["first_loss"], rel=1e-2)
    assert rows["fastft_auto80"]["first_loss"] == pytest.approx(rows["hf"]["first_loss"], rel=1e-2)
    assert rows["fastft"]["vs_hf"] == pytest.approx(rows["fastft"]["tokens_per_sec"] / rows["hf"]["tokens_per_sec"])
    assert rows["fastft_auto80"]["plan"] == "2/0/0"  # 80 GiB: no layer checkpointed
    assert rows["fastft_auto_unsloth"]["status"] == "skipped: no unsloth peak"
    assert "| none | 2 | fastft_auto80 | ok |" in out.with_suffix(".md").read_text()
