"""Smoke tests of benchmarks/train_bench.py on a tiny config (child mode, result tables, max-context
search) and of the harness every benchmark shares (benchmarks/harness.py)."""

import ast
import importlib
import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import load_script

BENCH_PATH = Path(__file__).parents[1] / "benchmarks" / "train_bench.py"
train_bench = load_script(BENCH_PATH)
harness = load_script(BENCH_PATH.with_name("harness.py"))

TINY = {"shape": "tiny", "seq_len": 24, "warmup_steps": 1, "timed_steps": 1}


@pytest.mark.subprocess
@pytest.mark.slow
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
    assert fastft["build_s"] > 0 and fastft["step_s"] > 0


def test_the_module_builds_what_the_variant_trains(device, monkeypatch):
    """train_bench builds through CausalLMFineTune (no model swapped in): its hyper-parameters name
    the shape, SDPA, no cache, LoRA r16/alpha16/dropout 0 on every projection, the seed."""
    import lightning.pytorch as pl

    modules = []
    original_fit = pl.Trainer.fit

    def recording_fit(trainer, module, *args, **kwargs):
        modules.append(module)
        return original_fit(trainer, module, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "fit", recording_fit)
    result = train_bench.run_variant("fastft", device=device, **TINY)
    assert result["status"] == "ok"
    [module] = modules
    hparams = module.hparams
    assert hparams.model == harness.model_fields("tiny") and hparams.model["attn_implementation"] == "sdpa"
    assert (hparams.lora_r, hparams.lora_alpha, hparams.lora_dropout) == (16, 16, 0.0)
    assert list(hparams.target_modules) == list(harness.LORA_TARGETS) and hparams.init_seed == 0
    assert hparams.quant_type is None
    hf_model = module.model.get_base_model()
    assert hf_model.config.num_hidden_layers == 2 and hf_model.config.use_cache is False
    assert {str(p.dtype) for p in hf_model.parameters()} == {"torch.bfloat16"}  # bf16-true: adapters included


def test_fastft_half_checkpoints_half_the_layers(device):
    half = train_bench.run_variant("fastft_half", device=device, layers=4, **TINY)
    assert half["status"] == "ok" and half["checkpointed_layers"] == 2
    assert len(half["losses"]) == 2 and all(math.isfinite(loss) for loss in half["losses"])
    assert "fastft_half" not in {v for runs in train_bench.PARTS.values() for run in runs for v in run["variants"]}


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed")
def test_liger_variant_is_skipped_without_liger_kernel(device):
    result = train_bench.run_variant("liger", device=device, **TINY)
    assert result["status"] == "skipped: liger-kernel missing"


def _old_train_bench_search(probe, start, high, granularity):
    """benchmarks/train_bench.py's --max-context loop before the harness, for comparison."""
    fits, fails, probes, length = 0, None, [], start
    while length is not None:
        status = probe(length)
        probes.append(length)
        if status == "ok":
            fits = length
        else:
            fails = length
        if fails is None:
            length = min(2 * length, high) if length < high else None
        else:
            step = max(granularity, fits // 16)
            middle = (fits + fails) // 2 // granularity * granularity
            length = middle if fails - fits > step and middle > fits else None
    return fits, fails, probes


def _old_max_context_search(probe, low, high, granularity):
    """benchmarks/max_context.py's bisection before the harness, for comparison."""
    lo, hi, best, failed, probes = low // granularity, high // granularity, 0, None, []
    while lo <= hi:
        middle = (lo + hi) // 2
        probes.append(middle * granularity)
        if probe(middle * granularity) == "ok":
            best, lo = middle * granularity, middle + 1
        else:
            failed, hi = middle * granularity, middle - 1
    return best, failed, probes


@pytest.mark.parametrize("limit", [0, 1000, 5000, 8191, 36864, 70000, 163840, 250000])
def test_one_search_reproduces_both_former_searches(limit):
    def probe(length):
        return {"status": "ok" if length <= limit else "oom"}

    old_fits, old_fails, old_probes = _old_train_bench_search(lambda n: probe(n)["status"], 2048, 131072, 1024)
    found = harness.search_longest(probe, start=2048, high=131072, granularity=1024,
                                   tolerance=lambda fits: max(1024, fits // 16))  # fmt: skip
    assert (found["max_seq_len_fits"], found["first_failing_seq_len"]) == (old_fits, old_fails)
    assert [p["seq_len"] for p in found["probes"]] == old_probes and found["complete"]

    for low, high in ((8192, 196608), (151552, 262144)):
        best, failed, old_probes = _old_max_context_search(lambda n: probe(n)["status"], low, high, 4096)
        found = harness.search_longest(probe, low=low, high=high, granularity=4096)
        assert (found["max_seq_len_fits"], found["first_failing_seq_len"]) == (best, failed)
        assert [p["seq_len"] for p in found["probes"]] == old_probes and found["complete"]


def test_search_stops_on_an_error_and_at_the_deadline():
    statuses = iter(["ok", "error: boom"])
    found = harness.search_longest(lambda n: {"status": next(statuses)}, start=1024, high=8192, granularity=1024)
    assert found["error"] == "error: boom" and found["max_seq_len_fits"] == 1024 and not found["complete"]
    found = harness.search_longest(lambda n: {"status": "ok"}, low=1024, high=8192, granularity=1024,
                                   deadline=time.monotonic() - 1)  # fmt: skip
    assert found["probes"] == [] and not found["complete"]


def test_stopwatch_and_tables():
    stopwatch = harness.Stopwatch("cpu")
    for _ in range(3):
        with stopwatch:
            time.sleep(0.01)
    assert len(stopwatch.laps) == 3 and stopwatch.median(skip=1) >= 0.01
    assert harness.time_steps(lambda: None, 2, device="cpu") == pytest.approx([0, 0], abs=0.01)
    table = harness.markdown_table([{"a": 12.3456, "b": [1.0, 2.5], "c": [1, 2048]}, {"a": 0.1234}], ("a", "b", "c"))
    assert table.splitlines()[2:] == ["| 12 | 1.000 2.500 | [1, 2048] |", "| 0.123 |  |  |"]
    assert "| 12.346 |" in harness.markdown_table([{"a": 12.3456}], ("a",), integers_from=100)


def test_load_results_reads_the_older_layouts(tmp_path):
    legacy = {"command": "benchmarks/max_context.py --variants hf", "gpu": "H100", "variants": {"hf": {
        "longest_fitting": 4096, "shortest_failing": 8192, "complete": True,
        "probes": [{"seq_len": 4096, "fits": True, "peak_gib": 3.0}, {"seq_len": 8192, "fits": False, "peak_gib": 5.0}]}}}  # fmt: skip
    (tmp_path / "mc.json").write_text(json.dumps(legacy))
    meta, [row] = harness.load_results(tmp_path / "mc.json")
    assert meta["command"] == legacy["command"] and row["variant"] == "hf"
    assert (row["max_seq_len_fits"], row["first_failing_seq_len"]) == (4096, 8192)
    assert [p["status"] for p in row["probes"]] == ["ok", "oom"]


def test_kernels_tune_sweeps_and_restores_the_launch_policies(monkeypatch):
    tune = load_script(BENCH_PATH.with_name("kernels_tune.py"))
    names = {kernel: f"lightning_fastft.kernels.{kernel}" for kernel in ("rms_norm", "rope", "glu")}
    originals = {kernel: importlib.import_module(name)._LAUNCH for kernel, name in names.items()}
    seen = []

    def fake_rows(kernel, cases, sizes):
        seen.append((kernel, importlib.import_module(names[kernel])._LAUNCH))
        return []

    monkeypatch.setattr(tune, "_fastft_rows", fake_rows)
    tune.main()
    assert len(seen) == 12 + 4 + 12
    assert {(p.programs_per_sm, p.num_warps) for k, p in seen if k == "rms_norm"} == {
        (s, w) for s in (1, 2, 4, 8) for w in (4, 8, 16)}  # fmt: skip
    assert {p.num_warps for k, p in seen if k == "rope"} == {1, 2, 4, 8}
    assert {(p.max_block, p.num_warps) for k, p in seen if k == "glu"} == {
        (b, w) for b in (1024, 2048, 4096, 8192) for w in (4, 8, 16)}  # fmt: skip
    assert {k: importlib.import_module(n)._LAUNCH for k, n in names.items()} == originals


def test_benchmark_scripts_import_no_private_names_of_each_other():
    """Shared pieces live in benchmarks/harness.py; no script reaches into another's privates."""
    folder = BENCH_PATH.parent
    scripts = {path.stem for path in folder.glob("*.py")}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in scripts:
                assert all(not alias.name.startswith("_") for alias in node.names), (path.name, node.module)
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names if alias.name in scripts}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported:
                assert not node.attr.startswith("_"), (path.name, f"{node.value.id}.{node.attr}")
    assert not (folder / "kernels_timing.py").exists()


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
    rows[1]["patch_report"] = "lightning_fastft patching report, 1 model(s):\nrms_norm 5"
    train_bench.write_results(out, "Training benchmark", meta, rows)
    assert json.loads(out.read_text())["results"][1]["speedup_vs_hf"] == pytest.approx(2.5)
    assert harness.load_results(out)[1] == json.loads(json.dumps(rows))
    markdown = out.with_suffix(".md").read_text()
    assert "`python benchmarks/train_bench.py --part Z`" in markdown
    assert "| llama8b |  | 2048 | fastft | ok | 2500 | 2.500 | 20 | 0.500 |" in markdown
    assert "1.500 1.250" in markdown and "| oom |" in markdown
    assert "- fastft (llama8b, seq 2048): lightning_fastft patching report, 1 model(s):; rms_norm 5" in markdown

    pytest.importorskip("matplotlib", reason="matplotlib (dev extra) draws the chart; the tables above need nothing")
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
