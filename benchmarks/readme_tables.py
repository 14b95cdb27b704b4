"""The README's result tables, generated from the result files in ``benchmarks/results/``.

    python benchmarks/readme_tables.py           # rewrite the generated blocks of README.md
    python benchmarks/readme_tables.py --check   # exit 1 with a diff when README.md is out of date

Each table lives in README.md between ``<!-- BEGIN generated: <name> ... -->`` and
``<!-- END generated: <name> -->``; only those blocks are rewritten. Which run feeds which row is
declared below (:data:`TRAIN_ROWS`, :data:`MAX_CONTEXT_FILES`): after a new run, point the row at
its file (and move the file it replaces to ``results/archive/<date>/``), then run this script.
``tests/test_readme_tables.py`` fails while README.md and the results disagree.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
GENERATOR = "python benchmarks/readme_tables.py"

TRAIN_VARIANTS = ("hf", "liger", "fastft", "fastft_offload", "fastft_nockpt")
# (row label, results file, shape, quant, seq_len): one tokens/s row and one peak-memory row each
TRAIN_ROWS: tuple[tuple[str, str, str, Optional[str], int], ...] = (
    ("8B LoRA seq 2048 (`--part A`)", "train_partA_run3.json", "llama8b", None, 2048),
    ("8B QLoRA seq 2048 (`--part B`)", "train_partB_run2.json", "llama8b", "nf4", 2048),
    ("8B LoRA seq 8192 (`--part C`)", "train_partC.json", "llama8b", None, 8192),
    ("8B QLoRA seq 16384 (`--part E`)", "train_partE.json", "llama8b", "nf4", 16384),
    ("Qwen2-7B LoRA seq 2048 (`--part D`)", "train_partD_run2.json", "qwen7b", None, 2048),
    ("Llama-1B LoRA seq 2048 (`--part D`)", "train_partD_run2.json", "llama1b", None, 2048),
)
# (results file, variant) -> footnote mark after the tokens/s cell
TRAIN_MARKS = {("train_partB_run2.json", "fastft_offload"): "†"}
# (results file, variant) whose peak memory is shown in bold with its share of hf's
TRAIN_MEMORY_HIGHLIGHTS = {("train_partE.json", "fastft_offload")}

# later files override earlier ones for the variants they hold
MAX_CONTEXT_FILES = (
    "max_context_8b_qlora.json", "max_context_8b_qlora_liger.json", "max_context_8b_qlora_offload.json",
    "max_context_8b_qlora_344k.json",
)  # fmt: skip
MAX_CONTEXT_VARIANTS = ("hf", "liger", "fastft", "fastft_offload")
MISSING = "—"

# bench_step.py runs: (row label, the results files of one lease); every (quant, batch) in them is one pair of rows
STEP_ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("8B LoRA (12-02)", ("step_llama8b_bf16_h200.json",)),
    ("8B QLoRA (12-02)", ("step_llama8b_nf4_h200.json",)),
    ("Qwen3-30B-A3B shape, 8 layers, LoRA (12-02)", ("step_qwen3moe_8l_h200.json",)),
    ("8B LoRA (12-03)", ("step_llama8b_bf16_bs4_graphs_h200.json",)),
    ("8B LoRA (12-03, 2 rounds)", ("step_llama8b_bf16_bs1_graphs_rounds_h200.json",)),
    ("8B QLoRA (12-03b)", ("step_llama8b_nf4_bs1_graphs_h200.json",)),
    ("Qwen3-30B-A3B shape, 8 layers, LoRA (12-04)", ("step_qwen3moe_8l_unsloth_h200.json",)),
    (
        "Qwen3-30B-A3B shape, 48 layers, LoRA (12-04b)",
        ("step_qwen3moe_48l_bs4_h200.json", "step_qwen3moe_48l_bs4_auto80_h200.json", "step_qwen3moe_48l_bs1_h200.json"),
    ),
    ("8B LoRA (12-04b)", ("step_llama8b_bf16_bs4_skip_down_h200.json",)),
    ("8B QLoRA (12-04b)", ("step_llama8b_nf4_bs4_skip_down_h200.json",)),
    ("8B LoRA (12-04c)", ("step_llama8b_bf16_bs4_auto_h200.json",)),
    ("8B LoRA (12-05, before prefill)", ("step_llama8b_bf16_bs4_prefill_before_h200.json",)),
    (
        "8B LoRA (12-05, prefill)",
        ("step_llama8b_bf16_bs4_prefill_before_h200.json", "step_llama8b_bf16_bs4_prefill_after_h200.json"),
    ),
    ("8B LoRA (12-05b)", ("step_llama8b_bf16_bs4_prefill_auto_h200.json",)),
    ("8B QLoRA (12-05b)", ("step_llama8b_nf4_bs4_prefill_h200.json",)),
    ("8B LoRA (12-05d, H100)", ("step_llama8b_bf16_bs4_auto_h100.json",)),
    ("8B QLoRA (12-05d, H100)", ("step_llama8b_nf4_bs4_auto_h100.json",)),
)
STEP_VARIANTS = (
    "hf", "liger", "unsloth", "fastft", "fastft_offload", "fastft_auto80", "fastft_auto_unsloth", "fastft_graphs",
    "fastft_graphs_auto80",
)  # fmt: skip


def _train_rows(results_dir: Path, file: str, shape: str, quant: Optional[str], seq_len: int) -> dict[str, dict]:
    _, rows = harness.load_results(results_dir / file)
    return {
        row["variant"]: row
        for row in rows
        if row["shape"] == shape and row.get("quant") == quant and row["seq_len"] == seq_len and row["status"] == "ok"
    }


def train_table(results_dir: Path = harness.RESULTS_DIR) -> str:
    """Tokens/s (speedup over hf) and peak GiB per variant, one pair of rows per :data:`TRAIN_ROWS` entry."""
    lines = ["| run (command) | " + " | ".join(TRAIN_VARIANTS) + " |", "|---" * (len(TRAIN_VARIANTS) + 1) + "|"]
    for label, file, shape, quant, seq_len in TRAIN_ROWS:
        by_variant = _train_rows(results_dir, file, shape, quant, seq_len)
        if "hf" not in by_variant:
            raise ValueError(f"{file}: no successful hf row for {shape} {quant} seq {seq_len}")
        speed, memory = [], []
        for variant in TRAIN_VARIANTS:
            row = by_variant.get(variant)
            if row is None:
                speed.append(MISSING)
                memory.append(MISSING)
                continue
            tokens = f"{row['tokens_per_sec']:.0f}"
            if variant != "hf":
                tokens += f" ({row['speedup_vs_hf']:.2f}x)"
            speed.append(tokens + TRAIN_MARKS.get((file, variant), ""))
            peak = f"{row['peak_mem_gib']:.1f}"
            if (file, variant) in TRAIN_MEMORY_HIGHLIGHTS:
                peak = f"**{peak} ({row['mem_vs_hf']:.0%})**"
            memory.append(peak)
        lines.append(f"| {label} tok/s | " + " | ".join(speed) + " |")
        lines.append("| peak GiB | " + " | ".join(memory) + " |")
    sources = ", ".join(f"`{file}`" for file in dict.fromkeys(file for _, file, *_ in TRAIN_ROWS))
    lines += ["", f"Sources (`benchmarks/results/`): {sources}."]
    return "\n".join(lines)


def _peak_at(row: dict[str, Any], seq_len: int) -> Optional[float]:
    for probe in row.get("probes", []):
        if probe["seq_len"] == seq_len and probe["status"] == "ok":
            return probe.get("peak_gib", probe.get("peak_mem_gib"))
    return None


def max_context_table(results_dir: Path = harness.RESULTS_DIR) -> str:
    """Longest trainable sequence per variant, each from the last of :data:`MAX_CONTEXT_FILES` holding it."""
    latest: dict[str, tuple[str, dict]] = {}
    for file in MAX_CONTEXT_FILES:
        for row in harness.load_results(results_dir / file)[1]:
            latest[row["variant"]] = (file, row)
    lines = [
        "| variant | longest seq that trains (bs 1) | peak GiB there | shortest failing | search complete | source |",
        "|---|---|---|---|---|---|",
    ]
    for variant in MAX_CONTEXT_VARIANTS:
        if variant not in latest:
            continue
        file, row = latest[variant]
        fits, fails = row["max_seq_len_fits"], row["first_failing_seq_len"]
        peak = _peak_at(row, fits)
        closed = row["complete"] and fails is not None  # a search that never failed only bounds from below
        longest = f"{fits:,}" if closed else f"≥ {fits:,}"
        searched = "yes" if closed else "no (time budget)" if not row["complete"] else "no (nothing failed up to the search's top)"
        cells = [variant, longest, MISSING if peak is None else f"{peak:.1f}",
                 MISSING if fails is None else f"{fails:,}", searched, f"`{file}`"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def step_table(results_dir: Path = harness.RESULTS_DIR) -> str:
    """Tokens/s (ratio to Unsloth's, else to HF's, in the same row's files) and peak GiB per variant of the
    ``bench_step.py`` runs of :data:`STEP_ROWS`; a variant that ran but failed shows its status."""
    lines = ["| run | " + " | ".join(STEP_VARIANTS) + " |", "|---" * (len(STEP_VARIANTS) + 1) + "|"]
    for label, files in STEP_ROWS:
        rows = [row for file in files for row in harness.load_results(results_dir / file)[1]]
        for quant, batch in dict.fromkeys((row["quant"], row["batch"]) for row in rows):
            by_variant = {row["variant"]: row for row in rows if (row["quant"], row["batch"]) == (quant, batch)}
            base = "unsloth" if by_variant.get("unsloth", {}).get("status") == "ok" else "hf"
            base_tokens = by_variant[base]["tokens_per_sec"]
            speed, memory = [], []
            for variant in STEP_VARIANTS:
                row = by_variant.get(variant)
                if row is None or row["status"].startswith("skipped"):
                    speed.append(MISSING)
                    memory.append(MISSING)
                elif row["status"] != "ok":
                    speed.append(row["status"])
                    memory.append(MISSING)
                else:
                    ratio = "" if variant == base else f" ({row['tokens_per_sec'] / base_tokens:.2f}x)"
                    speed.append(f"{row['tokens_per_sec']:.0f}{ratio}")
                    memory.append(f"{row['peak_gib']:.1f}")
            lines.append(f"| {label}, bs {batch} tok/s (x {base}) | " + " | ".join(speed) + " |")
            lines.append("| peak GiB | " + " | ".join(memory) + " |")
    sources = ", ".join(f"`{file}`" for file in dict.fromkeys(file for _, files in STEP_ROWS for file in files))
    lines += ["", f"Sources (`benchmarks/results/`): {sources}."]
    return "\n".join(lines)


TABLES = {"train": train_table, "max_context": max_context_table, "step": step_table}


def _block_pattern(name: str) -> re.Pattern:
    return re.compile(
        rf"(<!-- BEGIN generated: {re.escape(name)}\b[^>]*-->\n)(.*?)(<!-- END generated: {re.escape(name)} -->)",
        re.DOTALL,
    )


def render(readme_text: str, results_dir: Path = harness.RESULTS_DIR) -> str:
    """``readme_text`` with every generated block rewritten from ``results_dir``."""
    for name, table in TABLES.items():
        pattern = _block_pattern(name)
        if len(pattern.findall(readme_text)) != 1:
            raise ValueError(f"README.md must hold exactly one '<!-- BEGIN generated: {name} -->' ... END block")
        body = table(results_dir)
        readme_text = pattern.sub(lambda match: match.group(1) + body + "\n" + match.group(3), readme_text)
    return readme_text


def diff(readme: Path = README, results_dir: Path = harness.RESULTS_DIR) -> str:
    """Unified diff from ``readme`` to what this script would write; empty when in sync."""
    current = readme.read_text()
    lines = difflib.unified_diff(
        current.splitlines(keepends=True), render(current, results_dir).splitlines(keepends=True),
        fromfile=str(readme), tofile=f"{readme} ({GENERATOR})",
    )  # fmt: skip
    return "".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 with a diff when out of date")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=harness.RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.check:
        changes = diff(args.readme, args.results)
        if changes:
            print(f"{args.readme} is out of date with {args.results}; run `{GENERATOR}`:\n{changes}")
            return 1
        return 0
    current = args.readme.read_text()
    updated = render(current, args.results)
    if updated != current:
        args.readme.write_text(updated)
        print(f"rewrote the generated tables of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
