"""Two-device training through ``Trainer.fit``: ``fastft_ddp`` / ``fastft_fsdp`` on 2 devices against
``fastft`` on 1 with the same global batch (loss per step, tokens/s scaling, memory per rank), and
adapter-only checkpoints saved on one device count and resumed on the other.

    . benchmarks/gpu_env.sh        # on a machine with 2 GPUs (nvidia-h200-x2); each line < 10 minutes
    python benchmarks/bench_two_gpus.py --quant none    # llama8b, seq 2048, bf16 LoRA, recompute + offload
    python benchmarks/bench_two_gpus.py --quant nf4     # QLoRA (fastft_fsdp refused, see below)
    python benchmarks/bench_two_gpus.py --resume-check --quant none --checkpointing recompute
    python benchmarks/bench_two_gpus.py --accelerator cpu --shape tiny --seq-len 32 --precision 32-true  # gloo

Every run is its own process (``python bench_two_gpus.py --child <spec>``); on 2 devices Lightning
launches the second rank itself by running that same command again (its subprocess launcher), so
no ``torchrun`` is needed. The parent loops over the runs and writes the results after each one.

The same global batch on every device count (token-exact): ``--global-batch`` rows ``G`` per
optimizer step; one device trains them as one batch, ``n`` devices as ``G / n`` rows per rank, no
gradient accumulation anywhere. Step ``s`` trains on rows ``[s G, (s+1) G)``, rank ``r`` on the
``r``-th ``G / n`` of them, whatever the device count or epoch length (:class:`StepSampler`;
Lightning's distributed sampler is off). Rows are random tokens whose first ``U(0, seq_len / 2)``
positions are a prompt without loss, so the ranks see unequal numbers of target tokens and DDP's
plain average of their mean losses would weight tokens unequally; the strategies' token-exact
gradient (:mod:`lightning_fastft.training.token_exact`) makes it the gradient of the one batch of
``G`` rows that the 1-device run computes directly. (Accumulating ``n`` micro-batches on one
device would match the ``n``-rank run even with plain averaging, so it would not check the
weighting across ranks.) ``scaling_vs_1`` is thus strong scaling: each of ``n`` ranks does ``1/n``
of the 1-device step's work.

Per run: the loss of every optimizer step (the mean over every rank's target tokens: the loss of
the global batch), tokens/s (the global batch's tokens, all ``--seq-len`` positions, over the median
step time after ``--warmup-steps``; steps timed on rank 0 between step ends, CUDA synchronised),
and per rank the allocation once the model is set up (``weights_gib``: FSDP shards the frozen
weights) and the peak allocation over the fit (``peak_mem_gib``; CUDA only). Each multi-device row
is compared with the ``fastft`` 1-device row of the same quantisation and checkpointing:
``max_abs_loss_diff`` over the steps and ``scaling_vs_1`` (the tokens/s ratio).

``--resume-check`` (``k = --first-steps``, ``m = --resumed-steps``; epochs of ``gcd(k, m)`` steps,
adapter-only checkpoints at epoch ends): an uninterrupted ``fastft`` 1-device run of ``k + m``
steps, and per distributed strategy ``S``: ``S`` on 2 devices for ``k`` steps, then ``fastft`` on 1
device resumed from its checkpoint for ``m`` steps (2->1); ``S`` on 2 devices resumed from the
uninterrupted run's step-``k`` checkpoint (1->2). Resumed losses are compared with the
uninterrupted run's steps ``k .. k+m``. (Lightning resumes by epochs: with ``max_steps`` it would
resume an epoch-end checkpoint as if the epoch were still running.)

FSDP is Lightning's ``FSDPStrategy``, i.e. torch FSDP1 (``use_orig_params=True``), one unit per
decoder layer (``auto_wrap_policy``: transformers' ``GradientCheckpointingLayer``, which every HF
decoder layer is). A unit's frozen weights and LoRA adapters share one flat parameter, so its
gradient and reduce-scatter cover the frozen weights too (torch warns about it); Lightning offers
FSDP2 (per-parameter sharding) only in ``ModelParallelStrategy``, which ``fastft_fsdp`` does not
compose. Refused, with the reason in the results: ``fastft_fsdp`` with ``nf4`` (the strategy itself
refuses 4-bit layers at set-up: ``refuse_4bit_layers``) and ``fastft_fsdp`` on CPU (Lightning gives FSDP no ``device_id`` there, and FSDP1 then needs an
accelerator).

Results: ``benchmarks/results/two_gpus_<shape>_<quants>[_resume].json`` and ``.md`` (``harness.write_results``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import LORA_R, LORA_TARGETS, SHAPES  # noqa: E402

STRATEGIES = ("fastft", "fastft_ddp", "fastft_fsdp")
DISTRIBUTED = ("fastft_ddp", "fastft_fsdp")
QUANTS = ("none", "nf4")
CHECKPOINTING = ("recompute", "offload")
REFUSALS = {
    ("fastft_fsdp", "nf4"): (
        "refused: fastft_fsdp refuses QLoRA's 4-bit layers at set-up (see "
        "lightning_fastft.strategies.fastft.refuse_4bit_layers); not started, to save a 2-GPU model load"
    ),
    ("fastft_fsdp", "cpu"): (
        "refused: fastft_fsdp needs CUDA: Lightning's FSDPStrategy passes FSDP no device_id on CPU and "
        "torch's FSDP1 then needs an accelerator ('FSDP needs a non-CPU accelerator device')"
    ),
}
TABLE_COLUMNS = (
    "quant", "checkpointing", "strategy", "devices", "status", "tokens_per_sec", "scaling_vs_1",
    "max_abs_loss_diff", "weights_gib", "peak_mem_gib", "step_s", "losses",
)  # fmt: skip
RESUME_COLUMNS = (
    "quant", "checkpointing", "strategy", "direction", "status", "max_abs_loss_diff", "first_max_abs_loss_diff", "first_losses",
    "resumed_losses", "reference_losses", "checkpoint_keys", "frozen_keys_saved", "checkpoint_mib",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# child mode: one run (all its ranks), one process per rank
# ---------------------------------------------------------------------------------------------
class TokenRows:
    """``num_rows`` rows of ``seq_len`` random tokens; row ``i`` is drawn from its own generator (seeded
    from ``seed`` and ``i``), so it is the same however many rows a run holds. The first ``U(0,
    seq_len / 2)`` positions of a row are a prompt without loss (label -100)."""

    def __init__(self, vocab_size: int, seq_len: int, num_rows: int, seed: int) -> None:
        self.vocab_size, self.seq_len, self.num_rows, self.seed = vocab_size, seq_len, num_rows, seed

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> dict:
        from lightning_fastft.constants import IGNORE_INDEX

        if not 0 <= index < self.num_rows:
            raise IndexError(f"row {index} of {self.num_rows}")
        # torch's CPU generator keeps 32 bits of a seed: mix (seed, index) into 32 bits
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence((self.seed, index)).generate_state(1)[0]))
        input_ids = torch.randint(0, self.vocab_size, (self.seq_len,), generator=generator)
        prompt = int(torch.randint(0, self.seq_len // 2, (), generator=generator))
        labels = input_ids.clone()
        labels[:prompt] = IGNORE_INDEX
        return {"input_ids": input_ids, "labels": labels}


class StepSampler:
    """The row indices one rank reads, in order: optimizer step ``s`` trains on rows ``[s G, (s+1) G)``
    (``G = rank_batch * world_size``), rank ``r`` on the ``r``-th ``rank_batch`` of them. Epoch ``e``
    covers steps ``[e S, (e+1) S)``, ``S = steps_per_epoch`` (Lightning calls :meth:`set_epoch`), so
    the rows of a step depend neither on the device count nor on where a run was resumed."""

    def __init__(self, rank: int, world_size: int, rank_batch: int, steps_per_epoch: int) -> None:
        self.rank, self.world_size, self.rank_batch = rank, world_size, rank_batch
        self.steps_per_epoch, self.epoch = steps_per_epoch, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps_per_epoch * self.rank_batch

    def __iter__(self):
        for step in range(self.epoch * self.steps_per_epoch, (self.epoch + 1) * self.steps_per_epoch):
            start = (step * self.world_size + self.rank) * self.rank_batch
            yield from range(start, start + self.rank_batch)


def _datamodule(spec: dict[str, Any]):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    num_rows = spec["epochs"] * spec["steps_per_epoch"] * spec["global_batch"]
    rows = TokenRows(SHAPES[spec["shape"]]["vocab_size"], spec["seq_len"], num_rows, spec["seed"])
    rank_batch = spec["global_batch"] // spec["devices"]

    class StepData(pl.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            trainer = self.trainer
            sampler = StepSampler(trainer.global_rank, trainer.world_size, rank_batch, spec["steps_per_epoch"])
            return DataLoader(rows, batch_size=rank_batch, sampler=sampler)

    return StepData()


def _recorder_class():
    import lightning.pytorch as pl

    from lightning_fastft.training.token_exact import count_target_tokens

    class StepRecorder(pl.Callback):
        """Per optimizer step (one batch per rank): the loss of the global batch (the mean over every
        rank's target tokens) and the step's wall time (rank 0, device synchronised, between step
        ends). Per rank: the allocation at ``on_fit_start`` (model set up) and the peak allocation
        after it (CUDA)."""

        def __init__(self) -> None:
            self.losses: list[float] = []
            self.step_s: list[float] = []
            self.memory_gib: Optional[list[list[float]]] = None  # per rank: [weights, peak]
            self._last = 0.0

        def on_fit_start(self, trainer, pl_module) -> None:
            device = pl_module.device
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
                self._weights = torch.cuda.memory_allocated(device)
                self._peak = harness.PeakMemory(device).start()

        def on_train_start(self, trainer, pl_module) -> None:
            harness.synchronize(pl_module.device)
            self._last = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss, tokens = outputs["loss"].detach().double(), count_target_tokens(batch).double()
            total_loss, total_tokens = trainer.strategy.reduce(torch.stack([loss * tokens, tokens]), reduce_op="sum")
            self.losses.append((total_loss / total_tokens).item())
            harness.synchronize(pl_module.device)
            now = time.perf_counter()
            self.step_s.append(now - self._last)
            self._last = now

        def on_train_end(self, trainer, pl_module) -> None:
            if pl_module.device.type != "cuda":
                return
            stats = torch.tensor([self._weights, self._peak.stop()], dtype=torch.float64, device=pl_module.device)
            gathered = trainer.strategy.all_gather(stats).reshape(-1, 2) / harness.GIB
            self.memory_gib = gathered.tolist()

    return StepRecorder


def fsdp_wrap_policy() -> set:
    """FSDP units: every HF decoder layer (transformers' ``GradientCheckpointingLayer``)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return {GradientCheckpointingLayer}


def _strategy(spec: dict[str, Any]):
    from lightning_fastft.strategies import FastFTDDPStrategy, FastFTFSDPStrategy, FastFTStrategy

    options = {"checkpointing": spec["checkpointing"]}
    timeout = timedelta(seconds=spec["timeout_s"])  # a rank that died fails the other one's collectives
    if spec["strategy"] == "fastft":
        return FastFTStrategy(**options)
    if spec["strategy"] == "fastft_ddp":
        return FastFTDDPStrategy(timeout=timeout, **options)
    return FastFTFSDPStrategy(auto_wrap_policy=fsdp_wrap_policy(), timeout=timeout, **options)


def _checkpoint_facts(path: Path, module) -> dict[str, Any]:
    """Size and keys of a saved checkpoint; ``frozen_keys_saved``: keys that are not trainable weights
    of ``module`` (0 for an adapter-only checkpoint)."""
    from lightning_fastft.training.adapter_checkpoint import trainable_state_keys

    state = torch.load(path, weights_only=False, map_location="cpu")["state_dict"]
    return {
        "checkpoint_mib": path.stat().st_size / harness.MIB,
        "checkpoint_keys": len(state),
        "frozen_keys_saved": len(state.keys() - trainable_state_keys(module)),
    }


def run(spec: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Train the run ``spec`` describes (this process is one of its ranks); the result on rank 0, else None."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_fastft.module import CausalLMFineTune

    pl.seed_everything(spec["seed"], verbose=False)
    module = CausalLMFineTune(
        model=harness.model_fields(spec["shape"], spec["layers"]), lora_r=LORA_R, lora_alpha=LORA_R,
        lora_dropout=0.0, target_modules=list(LORA_TARGETS), quant_type=spec["quant"],
        learning_rate=spec["learning_rate"], init_seed=spec["seed"],
    )  # fmt: skip
    recorder = _recorder_class()()
    callbacks: list[Any] = [recorder]
    if spec["save_dir"]:
        callbacks.append(ModelCheckpoint(dirpath=spec["save_dir"], filename="{step}", save_top_k=-1, every_n_epochs=1))
    trainer = pl.Trainer(
        accelerator=spec["accelerator"],
        devices=spec["devices"],
        strategy=_strategy(spec),
        precision=spec["precision"],
        max_epochs=spec["epochs"],
        use_distributed_sampler=False,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=bool(spec["save_dir"]),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, _datamodule(spec), ckpt_path=spec["resume_from"])
    if trainer.global_rank != 0:
        return None
    step_s = recorder.step_s[spec["warmup_steps"] :] or recorder.step_s
    median_s = sorted(step_s)[len(step_s) // 2]
    result: dict[str, Any] = {
        "status": "ok", "losses": recorder.losses, "step_s": median_s,
        "tokens_per_sec": spec["global_batch"] * spec["seq_len"] / median_s,
        "patch_report": str(trainer.strategy.patch_report),
    }  # fmt: skip
    if recorder.memory_gib is not None:
        result["weights_gib"] = [rank[0] for rank in recorder.memory_gib]
        result["peak_mem_gib"] = [rank[1] for rank in recorder.memory_gib]
        result["gpu"] = torch.cuda.get_device_name()
    if spec["save_dir"]:
        result["checkpoints"] = {p.name: _checkpoint_facts(p, module) for p in Path(spec["save_dir"]).glob("*.ckpt")}
    return result


def run_child(spec: dict[str, Any], json_out: Path) -> None:
    """Child mode: run ``spec``; rank 0 writes the result (or the failure) to ``json_out``."""
    try:
        result = run(spec)
    except Exception as error:  # noqa: BLE001 - the failure is the result
        traceback.print_exc()
        if int(os.environ.get("LOCAL_RANK", "0")) != 0:
            raise
        message = str(error).splitlines()[0][:300] if str(error) else ""
        status = "oom" if harness.is_out_of_memory(error) else f"error: {type(error).__name__}: {message}"
        result = {"status": status}
    if result is not None:
        json_out.write_text(json.dumps(result, indent=1))


# ---------------------------------------------------------------------------------------------
# parent mode: one process per run, comparisons, results
# ---------------------------------------------------------------------------------------------
def refusal(strategy: str, quant: str, accelerator: str) -> Optional[str]:
    """Why the parent does not run ``strategy`` with ``quant`` on ``accelerator`` (None: it runs)."""
    return REFUSALS.get((strategy, quant)) or REFUSALS.get((strategy, accelerator))


class Runner:
    """Spawns the runs (``--child``), one at a time, within the time budget."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.deadline = time.monotonic() + args.time_budget

    def spec(self, strategy: str, devices: int, quant: str, checkpointing: str, **overrides: Any) -> dict[str, Any]:
        args = self.args
        remaining = self.deadline - time.monotonic()
        return {
            "strategy": strategy, "devices": devices, "quant": None if quant == "none" else quant,
            "checkpointing": checkpointing, "shape": args.shape, "layers": args.layers, "seq_len": args.seq_len,
            "global_batch": args.global_batch, "epochs": 1, "steps_per_epoch": args.warmup_steps + args.timed_steps,
            "warmup_steps": args.warmup_steps, "precision": args.precision, "accelerator": args.accelerator,
            "learning_rate": args.learning_rate, "seed": args.seed, "save_dir": None, "resume_from": None,
            "timeout_s": max(1.0, min(args.child_timeout, remaining)), **overrides,
        }  # fmt: skip

    def __call__(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Run ``spec`` in a fresh process group (killed whole on timeout); its result dict (a refused
        or skipped run: the reason as its status)."""
        row = {key: spec[key] for key in ("strategy", "devices", "checkpointing")}
        row["quant"] = spec["quant"] or "none"
        refused = refusal(spec["strategy"], row["quant"], spec["accelerator"])
        if refused:
            return {**row, "status": refused}
        if self.deadline - time.monotonic() < 20:
            return {**row, "status": "skipped: time budget spent"}
        print(f"[bench_two_gpus] {row}", flush=True)
        with tempfile.TemporaryDirectory() as scratch:
            json_out = Path(scratch) / "result.json"
            command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec), "--json-out", str(json_out)]
            process = subprocess.Popen(command, start_new_session=True)
            try:
                process.wait(timeout=spec["timeout_s"])
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # rank 0 and the ranks Lightning started from it
                process.wait()
                return {**row, "status": f"error: timed out after {spec['timeout_s']:.0f} s"}
            if not json_out.exists():
                return {**row, "status": f"error: child exited with {process.returncode} without a result"}
            return {**row, **json.loads(json_out.read_text())}


def max_abs_diff(losses: list[float], reference: list[float]) -> Optional[float]:
    """Largest ``|loss - reference|`` over the steps; None unless both have the same number of steps."""
    if not losses or len(losses) != len(reference):
        return None
    return max(abs(a - b) for a, b in zip(losses, reference))


def compare_with_one_device(rows: list[dict]) -> None:
    """``max_abs_loss_diff`` and ``scaling_vs_1`` of every run against the ``fastft`` 1-device run
    of the same quantisation and checkpointing."""
    references = {
        (r["quant"], r["checkpointing"]): r
        for r in rows
        if r["strategy"] == "fastft" and r["devices"] == 1 and r["status"] == "ok"
    }
    for row in rows:
        reference = references.get((row["quant"], row["checkpointing"]))
        if reference is None or row is reference or row["status"] != "ok":
            continue
        row["max_abs_loss_diff"] = max_abs_diff(row["losses"], reference["losses"])
        row["scaling_vs_1"] = row["tokens_per_sec"] / reference["tokens_per_sec"]


def notes(args: argparse.Namespace, rows: list[dict]) -> list[str]:
    lines = [
        f"- Global batch {args.global_batch} rows x seq {args.seq_len} per step on every device count (n devices: "
        f"{args.global_batch}/n rows per rank, no accumulation), token-exact gradients; {args.precision}, LoRA "
        f"r{LORA_R} alpha {LORA_R} on {', '.join(LORA_TARGETS)}; AdamW lr {args.learning_rate}.",
        "- Losses: per optimizer step, the token-weighted mean over every rank's target tokens (the loss of the "
        "global batch). max_abs_loss_diff and scaling_vs_1 are against the fastft 1-device row of the same "
        "quant and checkpointing.",
        "- weights_gib / peak_mem_gib: per rank, CUDA memory allocated once the model is set up (FSDP: sharded) "
        "and the peak over the fit.",
        "- fastft_fsdp: Lightning's FSDPStrategy = torch FSDP1 (use_orig_params=True), one unit per decoder "
        "layer; FSDP2 is only in Lightning's ModelParallelStrategy, which fastft does not compose.",
    ]
    reports = [r for r in rows if r.get("patch_report")]
    return lines + [f"- {r['strategy']} ({r['quant']}, {r['checkpointing']}): " + r["patch_report"].replace("\n", "; ") for r in reports]


def bench(args: argparse.Namespace) -> list[dict]:
    """Every (quant, checkpointing, strategy, device count) run, compared with the 1-device run."""
    runner, meta, rows = Runner(args), harness.run_meta(), []
    for quant in args.quant:
        for checkpointing in args.checkpointing:
            for strategy in args.strategies:
                for devices in _device_counts(strategy, args.devices):
                    rows.append(runner(runner.spec(strategy, devices, quant, checkpointing)))
                    compare_with_one_device(rows)
                    harness.write_results(args.out, "Two devices: fastft_ddp / fastft_fsdp vs one device", meta,
                                          rows, TABLE_COLUMNS, notes(args, rows))  # fmt: skip
    print(harness.markdown_table(rows, TABLE_COLUMNS))
    return rows


def _device_counts(strategy: str, devices: list[int]) -> list[int]:
    """``fastft`` runs on 1 device, the distributed strategies on every count above 1."""
    return [n for n in devices if (n == 1) == (strategy == "fastft")]


def _resume_row(base: dict, direction: str, first: dict, resumed: dict, reference: dict, k: int, m: int) -> dict:
    row = {**base, "direction": direction}
    failed = next((r["status"] for r in (reference, first, resumed) if r["status"] != "ok"), None)
    if failed:
        return {**row, "status": failed}
    expected = reference["losses"][k : k + m]
    first_losses, resumed_losses = first["losses"][:k], resumed["losses"]
    facts = first["checkpoints"][f"step={k}.ckpt"]
    return {
        **row, "status": "ok", "first_losses": first_losses, "resumed_losses": resumed_losses,
        "reference_losses": expected, "first_max_abs_loss_diff": max_abs_diff(first_losses, reference["losses"][:k]),
        "max_abs_loss_diff": max_abs_diff(resumed_losses, expected),
        **{key: facts[key] for key in ("checkpoint_keys", "frozen_keys_saved", "checkpoint_mib")},
    }  # fmt: skip


def resume_check(args: argparse.Namespace) -> list[dict]:
    """Per distributed strategy: adapter-only checkpoints from 2 devices resumed on 1 and back,
    against an uninterrupted 1-device run."""
    runner, meta, rows = Runner(args), harness.run_meta(), []
    k, m, devices = args.first_steps, args.resumed_steps, max(args.devices)
    epoch = math.gcd(k, m)  # epochs of this many steps: checkpoints at epoch ends, after step k among them
    schedule = {"epochs": (k + m) // epoch, "steps_per_epoch": epoch, "warmup_steps": 0}
    with tempfile.TemporaryDirectory() as scratch:
        for quant in args.quant:
            for checkpointing in args.checkpointing:
                base = {"quant": quant, "checkpointing": checkpointing}
                one_dir = Path(scratch, f"{quant}_{checkpointing}_fastft")
                reference = runner(runner.spec("fastft", 1, quant, checkpointing, save_dir=str(one_dir), **schedule))
                for strategy in [s for s in args.strategies if s in DISTRIBUTED]:
                    two_dir = Path(scratch, f"{quant}_{checkpointing}_{strategy}")
                    first = runner(runner.spec(strategy, devices, quant, checkpointing, save_dir=str(two_dir),
                                               **{**schedule, "epochs": k // epoch}))  # fmt: skip
                    resumed = runner(runner.spec("fastft", 1, quant, checkpointing, **schedule,
                                                 resume_from=str(two_dir / f"step={k}.ckpt")))  # fmt: skip
                    rows.append(_resume_row({**base, "strategy": strategy}, "2->1", first, resumed, reference, k, m))
                    resumed = runner(runner.spec(strategy, devices, quant, checkpointing, **schedule,
                                                 resume_from=str(one_dir / f"step={k}.ckpt")))  # fmt: skip
                    rows.append(_resume_row({**base, "strategy": strategy}, "1->2", reference, resumed, reference, k, m))
                    harness.write_results(args.out, "Adapter-only checkpoints across device counts", meta, rows,
                                          RESUME_COLUMNS, _resume_notes(args))  # fmt: skip
    print(harness.markdown_table(rows, RESUME_COLUMNS))
    return rows


def _resume_notes(args: argparse.Namespace) -> list[str]:
    k, m, devices = args.first_steps, args.resumed_steps, max(args.devices)
    return [
        f"- 2->1: the strategy on {devices} devices trains {k} steps and saves an adapter-only checkpoint; fastft on 1 "
        f"device resumes from it for {m} steps. 1->2: the uninterrupted fastft run's checkpoint after step {k}, "
        f"resumed on {devices} devices. Both against the uninterrupted 1-device run of {k + m} steps "
        "(reference_losses: its steps after the checkpoint).",
        f"- Global batch {args.global_batch} rows x seq {args.seq_len}, {args.precision}, AdamW lr {args.learning_rate}. "
        "frozen_keys_saved: checkpoint keys that are not trainable weights (0: adapter-only).",
    ]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2], help="device counts: 1 runs fastft, more the distributed strategies")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--quant", nargs="+", choices=QUANTS, default=list(QUANTS), help="none: bf16 LoRA; nf4: QLoRA")
    parser.add_argument("--checkpointing", nargs="+", choices=CHECKPOINTING, default=list(CHECKPOINTING))
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama8b")
    parser.add_argument("--layers", type=int, help="override the number of decoder layers")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--global-batch", type=int, default=4, help="rows per optimizer step, on every device count")
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps not timed (their losses are compared)")
    parser.add_argument("--timed-steps", type=int, default=5)
    parser.add_argument("--accelerator", choices=("cuda", "cpu"), default="cuda", help="cpu: gloo ranks (tests)")
    parser.add_argument("--precision", default="bf16-true", help="Lightning precision (32-true for exact CPU checks)")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0, help="model init, LoRA init and data")
    parser.add_argument("--resume-check", action="store_true", help="adapter-only checkpoints 2->1 and 1->2 devices")
    parser.add_argument("--first-steps", type=int, default=2, help="--resume-check: steps before the checkpoint")
    parser.add_argument("--resumed-steps", type=int, default=2, help="--resume-check: steps after it")
    parser.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/two_gpus_<shape>_<quants>[_resume].json)")
    parser.add_argument("--time-budget", type=float, default=560.0, help="seconds for all runs together")
    parser.add_argument("--child-timeout", type=float, default=300.0, help="seconds per run")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # child mode: the run's spec (JSON)
    parser.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        if args.json_out is None:
            parser.error("--child needs --json-out")
        return args
    _check_args(parser, args)
    if args.out is None:
        name = f"two_gpus_{args.shape}_{'_'.join(args.quant)}{'_resume' if args.resume_check else ''}"
        args.out = harness.RESULTS_DIR / f"{name}.json"
    return args


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    most = max(args.devices)
    if min(args.devices) < 1:
        parser.error(f"--devices must be positive, got {args.devices}")
    if args.global_batch < 1 or any(args.global_batch % n for n in args.devices):
        parser.error(f"--global-batch ({args.global_batch}) must be a positive multiple of every device count {args.devices}")
    if args.seq_len < 2:
        parser.error(f"--seq-len must be >= 2 (a row holds a prompt and targets), got {args.seq_len}")
    if min(args.timed_steps, args.first_steps, args.resumed_steps) < 1 or args.warmup_steps < 0:
        parser.error("--timed-steps, --first-steps and --resumed-steps must be >= 1, --warmup-steps >= 0")
    if args.resume_check and (most < 2 or 1 not in args.devices or not set(args.strategies) & set(DISTRIBUTED)):
        parser.error("--resume-check needs --devices 1 and a count above 1, and a distributed strategy in --strategies")
    if not any(_device_counts(s, args.devices) for s in args.strategies):
        parser.error(f"nothing to run: fastft runs on 1 device, {'/'.join(DISTRIBUTED)} on more; got --devices {args.devices}")
    if args.accelerator == "cuda" and torch.cuda.device_count() < most:
        parser.error(f"--devices {args.devices} needs {most} CUDA devices, found {torch.cuda.device_count()}")


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child is not None:
        spec = json.loads(args.child)
        if spec["accelerator"] == "cpu":
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
        run_child(spec, args.json_out)
    elif args.resume_check:
        resume_check(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
