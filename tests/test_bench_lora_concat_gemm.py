"""benchmarks/lora_concat_gemm.py on CPU at shapes divided by 64: every scheme computes the same group."""

import json
from pathlib import Path

from helpers import load_script

bench = load_script(Path(__file__).parents[1] / "benchmarks" / "lora_concat_gemm.py")


def test_every_scheme_matches_the_fp32_reference(tmp_path):
    out = tmp_path / "schemes.json"
    bench.main(["--device", "cpu", "--tokens", "48", "--scale", "64", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    per_group = len(bench.FORWARD) + len(bench.BACKWARD)
    assert len(rows) == (len(bench.GROUPS) + 1) * per_group
    for row in rows:
        assert row["err"] < 1e-2, row  # bf16 rounding (~4e-3); a wrong term is O(1)
        assert row["ms"] > 0
    assert {row["group"] for row in rows} == {*bench.GROUPS, "layer"}
    assert out.with_suffix(".md").read_text().count("| layer |") == per_group
