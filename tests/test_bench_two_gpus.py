"""benchmarks/bench_two_gpus.py on CPU: 2 gloo ranks (``fastft_ddp``) against 1 process (``fastft``), tiny
shape, fp32, plus its data layout and argument checks.

``fastft_fsdp`` is not run here: Lightning's FSDPStrategy gives torch's FSDP1 no ``device_id`` on
CPU and FSDP1 then refuses to start without an accelerator, so the script refuses it on CPU (as
it refuses QLoRA under FSDP) and these tests check that refusal is recorded.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_script

BENCH_PATH = Path(__file__).parents[1] / "benchmarks" / "bench_two_gpus.py"
bench = load_script(BENCH_PATH)
harness = load_script(BENCH_PATH.with_name("harness.py"))

# 1 row per rank on 2 ranks; lr 1e-2 so that a wrongly weighted gradient changes the next losses by
# far more than the tolerance (measured without token-exact weighting: 8e-4 on the second step)
TINY = ["--accelerator", "cpu", "--shape", "tiny", "--seq-len", "16", "--global-batch", "2", "--precision", "32-true",
        "--learning-rate", "1e-2", "--quant", "none", "--checkpointing", "recompute"]  # fmt: skip
TOLERANCE = 1e-5


def run_bench(out: Path, *options: str) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(BENCH_PATH), *TINY, *options, "--out", str(out)]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-4000:]
    meta, rows = harness.load_results(out)
    assert meta["command"].startswith("python ") and "--accelerator cpu" in meta["command"]
    assert out.with_suffix(".md").read_text().startswith("# ")
    return rows


def first_step_loss(global_batch: int) -> float:
    """The loss of step 0 computed here, without the bench: the module's own model (same seed, no
    patches, no update yet) on the first ``global_batch`` rows, one batch."""
    from lightning_fastft.module import CausalLMFineTune

    module = CausalLMFineTune(
        model=harness.model_fields("tiny"), lora_r=harness.LORA_R, lora_alpha=harness.LORA_R,
        target_modules=list(harness.LORA_TARGETS), init_seed=0,
    )  # fmt: skip
    module.configure_model()
    rows = bench.TokenRows(harness.SHAPES["tiny"]["vocab_size"], 16, global_batch, seed=0)
    batch = {key: torch.stack([rows[i][key] for i in range(global_batch)]) for key in ("input_ids", "labels")}
    with torch.no_grad():
        return module(**batch).loss.item()


@pytest.mark.ddp
@pytest.mark.subprocess
@pytest.mark.slow
def test_ddp_on_two_ranks_matches_one_process_step_for_step(tmp_path):
    rows = run_bench(tmp_path / "two.json", "--warmup-steps", "0", "--timed-steps", "3")
    by_run = {(row["strategy"], row["devices"]): row for row in rows}
    assert set(by_run) == {("fastft", 1), ("fastft_ddp", 2), ("fastft_fsdp", 2)}
    one, ddp = by_run["fastft", 1], by_run["fastft_ddp", 2]
    assert one["status"] == ddp["status"] == "ok", rows
    assert len(one["losses"]) == len(ddp["losses"]) == 3
    assert one["losses"][0] == pytest.approx(first_step_loss(2), abs=TOLERANCE)
    assert len(set(one["losses"])) == 3  # a new batch (and new adapters) every step
    assert ddp["max_abs_loss_diff"] <= TOLERANCE
    assert ddp["max_abs_loss_diff"] == pytest.approx(max(abs(a - b) for a, b in zip(ddp["losses"], one["losses"])))
    assert ddp["scaling_vs_1"] == pytest.approx(ddp["tokens_per_sec"] / one["tokens_per_sec"])
    assert by_run["fastft_fsdp", 2]["status"].startswith("refused: fastft_fsdp needs CUDA")


@pytest.mark.ddp
@pytest.mark.subprocess
@pytest.mark.slow
def test_adapter_checkpoints_resume_across_device_counts(tmp_path):
    """2 ranks -> 1 process and 1 -> 2, each resumed run equal to the uninterrupted 1-process run;
    the checkpoints hold the 28 LoRA tensors of the tiny model (2 layers x 7 projections x A, B) only."""
    rows = run_bench(tmp_path / "resume.json", "--resume-check", "--first-steps", "1", "--resumed-steps", "2")
    by_run = {(row["strategy"], row["direction"]): row for row in rows}
    assert set(by_run) == {(s, d) for s in ("fastft_ddp", "fastft_fsdp") for d in ("2->1", "1->2")}
    for direction in ("2->1", "1->2"):
        row = by_run["fastft_ddp", direction]
        assert row["status"] == "ok", row
        assert len(row["resumed_losses"]) == len(row["reference_losses"]) == 2
        assert row["max_abs_loss_diff"] <= TOLERANCE and row["first_max_abs_loss_diff"] <= TOLERANCE
        assert row["checkpoint_keys"] == 28 and row["frozen_keys_saved"] == 0
        assert by_run["fastft_fsdp", direction]["status"].startswith("refused: fastft_fsdp needs CUDA")


def test_step_sampler_gives_each_step_the_same_rows_on_any_device_count():
    def rows_per_step(world_size, steps_per_epoch, epochs):
        rank_batch = 4 // world_size
        steps = []
        for epoch in range(epochs):
            samplers = [bench.StepSampler(rank, world_size, rank_batch, steps_per_epoch) for rank in range(world_size)]
            for sampler in samplers:
                sampler.set_epoch(epoch)
            per_rank = [list(sampler) for sampler in samplers]
            assert all(len(indices) == len(sampler) for indices, sampler in zip(per_rank, samplers))
            for step in range(steps_per_epoch):
                steps.append(sorted(i for indices in per_rank for i in indices[step * rank_batch : (step + 1) * rank_batch]))
        return steps

    expected = [list(range(4 * step, 4 * step + 4)) for step in range(6)]
    assert rows_per_step(1, 6, 1) == rows_per_step(2, 6, 1) == rows_per_step(2, 2, 3) == rows_per_step(4, 3, 2) == expected


def test_token_rows_are_the_same_however_many_rows_a_run_holds():
    few, many = bench.TokenRows(256, 16, 4, seed=3), bench.TokenRows(256, 16, 12, seed=3)
    for index in range(4):
        torch.testing.assert_close(few[index], many[index])
    prompts = [int((many[i]["labels"] == -100).sum()) for i in range(12)]
    assert all(prompt < 8 for prompt in prompts) and len(set(prompts)) > 1  # unequal target counts
    assert not torch.equal(many[0]["input_ids"], bench.TokenRows(256, 16, 4, seed=4)[0]["input_ids"])
    with pytest.raises(IndexError, match="row 4 of 4"):
        few[4]


@pytest.mark.parametrize(
    "options, message",
    [
        (["--global-batch", "3"], "--global-batch (3) must be a positive multiple of every device count"),
        (["--devices", "0", "2"], "--devices must be positive"),
        (["--seq-len", "1"], "--seq-len must be >= 2"),
        (["--devices", "2", "--strategies", "fastft"], "nothing to run: fastft runs on 1 device"),
        (["--resume-check", "--devices", "2"], "--resume-check needs --devices 1 and a count above 1"),
    ],
)
def test_bad_arguments_are_refused_with_the_reason(options, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--accelerator", "cpu", *options])
    assert message in capsys.readouterr().err


def test_qlora_under_fsdp_is_refused_and_ddp_is_not():
    assert bench.refusal("fastft_fsdp", "nf4", "cuda").startswith("refused: fastft_fsdp refuses QLoRA")
    assert bench.refusal("fastft_ddp", "nf4", "cuda") is None and bench.refusal("fastft_fsdp", "none", "cuda") is None
