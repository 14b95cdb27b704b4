"""Smoke tests of benchmarks/train_bench.py on a tiny config: child mode, result tables, max-context search."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_script

BENCH_PATH = Path(__file__).parents[1] / "benchmarks" / "train_bench.py"
train_bench = load_script(BENCH_PATH)

TINY = {"shape": "tiny", "seq_len": 24, "warmup_steps": 1, "timed_steps": 1}


def test_child_mode_cli_writes_a_result(tmp_path, device):
    json_out = tmp_path / "hf.json"
    command = [sys.executable, str(BENCH_PATH), "--variant", "hf", "--shape", "tiny", "--device", device,
               "--layers", "1", "--seq-len", "24", "--warmup-steps", "1", "--timed-steps", "2", "--json-out", str(json_out)]  # fmt: skip
    subprocess.run(command, check=True, timeout=300, capture_output=True)
    result = json.loads(json_out.read_text())
    assert result["status"] == "ok", result
    assert result["variant"] == "hf" and result["layers"] == 1
    assert len(result["losses"]) == 3 and all(math.isfinite(loss) for loss in result["losses"])
    assert result["tokens_per_sec"] == pytest.approx(24 / result["step_s"])


def test_fastft_and_hf_variants_start_from_the_same_loss(device):
    """Same seed, weights and data: the first step's loss (before any update) agrees across variants."""
    hf = train_bench.run_variant("hf", device=device, **TINY)
    fastft = train_bench.run_variant("fastft", device=device, **TINY)
    assert hf["status"] == fastft["status"] == "ok"
    assert fastft["losses"][0] == pytest.approx(hf["losses"][0], rel=2e-2)
    assert math.isfinite(fastft["losses"][1])
    assert "rms_norm" in fastft["patch_report"] and fastft["checkpointed_layers"] == 2


def test_fastft_half_checkpoints_half_the_layers(device):
    half = train_bench.run_variant("fastft_half", device=device, layers=4, **TINY)
    assert half["status"] == "ok" and half["checkpointed_layers"] == 2
    assert all(math.isfinite(loss) for loss in half["losses"])
    assert "fastft_half" not in {v for runs in train_bench.PARTS.values() for run in runs for v in run["variants"]}


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed")
def test_liger_variant_is_skipped_without_liger_kernel(device):
    result = train_bench.run_variant("liger", device=device, **TINY)
    assert result["status"] == "skipped: liger-kernel missing"


def _row(variant, tokens_per_sec, peak, status="ok", shape="llama8b"):
    return {"variant": variant, "shape": shape, "quant": None, "seq_len": 2048, "status": status,
            "tokens_per_sec": tokens_per_sec, "peak_mem_gib": peak, "losses": [1.5, 1.25]}  # fmt: skip


def test_ratios_tables_and_plot(tmp_path):
    rows = [_row("hf", 1000.0, 40.0), _row("fastft", 2500.0, 20.0), _row("liger", None, None, "oom"),
            _row("hf", 700.0, 30.0, shape="llama1b"), _row("fastft", 1400.0, 15.0, shape="qwen7b")]  # fmt: skip
    train_bench.add_ratios(rows)
    assert rows[1]["speedup_vs_hf"] == pytest.approx(2.5) and rows[1]["mem_vs_hf"] == pytest.approx(0.5)
    assert "speedup_vs_hf" not in rows[2] and "speedup_vs_hf" not in rows[4]  # failed row; no hf baseline

    out = tmp_path / "train_test.json"
    meta = {"command": "python benchmarks/train_bench.py --part Z", "environment": {"torch": "x"}}
    train_bench.write_results(out, "Training benchmark", meta, rows)
    assert json.loads(out.read_text())["results"][1]["speedup_vs_hf"] == pytest.approx(2.5)
    markdown = out.with_suffix(".md").read_text()
    assert "`python benchmarks/train_bench.py --part Z`" in markdown
    assert "| llama8b |  | 2048 | fastft | ok | 2500 | 2.500 | 20 | 0.500 |" in markdown
    assert "1.500 1.250" in markdown and "| oom |" in markdown

    pytest.importorskip("matplotlib")
    plot = load_script(BENCH_PATH.with_name("plot.py"))
    png = plot.plot_results(rows, tmp_path / "chart.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("limit", [5000, 1500, 70000])
def test_max_context_search_brackets_the_limit(tmp_path, monkeypatch, limit):
    probed = []

    def fake_spawn(variant, run, args, timeout, *, seq_len, **overrides):
        probed.append(seq_len)
        return {"status": "ok" if seq_len <= limit else "oom", "peak_mem_gib": seq_len / 1000}

    monkeypatch.setattr(train_bench, "spawn_variant", fake_spawn)
    args = train_bench.parse_args(["--max-context", "--variants", "fastft", "--seq-len", "2048", "--shape", "tiny",
                                   "--out", str(tmp_path / "mc.json")])  # fmt: skip
    [result] = train_bench.max_context_search(args)
    fits, fails = result["max_seq_len_fits"], result["first_failing_seq_len"]
    assert fits <= limit < fails
    assert fits % 1024 == 0 and fails - fits <= max(1024, fits // 16)
    assert len(probed) == len(set(probed)) == len(result["probes"])
    assert (result["status"] == "ok") == (fits > 0)


def test_no_script_folder_shadows_hugging_face_kernels():
    """Running ``python benchmarks/x.py`` (or examples/, tests/) puts that folder first on sys.path:
    a ``kernels`` module there would shadow Hugging Face's ``kernels``, which transformers and
    bitsandbytes import."""
    root = Path(__file__).resolve().parents[1]
    for folder in (root, root / "benchmarks", root / "examples", root / "tests"):
        assert not (folder / "kernels.py").exists() and not (folder / "kernels").is_dir(), folder
