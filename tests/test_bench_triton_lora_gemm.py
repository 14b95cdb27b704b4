"""benchmarks/triton_lora_gemm.py on CPU (Triton interpreter, fp16, shapes divided by 32): the Triton
kernel, with and without the rank-r block, computes the same products as cuBLAS."""

import json
from pathlib import Path

from helpers import load_script

bench = load_script(Path(__file__).parents[1] / "benchmarks" / "triton_lora_gemm.py")


def test_triton_kernel_matches_the_fp32_reference(tmp_path):
    out = tmp_path / "gemm.json"
    bench.main(["--device", "cpu", "--tokens", "96", "--scale", "32", "--small-tiles", "--dtype", "float16",
                "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["results"]
    schemes = {"cublas", "cublas_prefill", "triton", "triton_lora"}
    assert len(rows) == len(bench.GROUPS) * 2 * len(schemes)
    assert {row["scheme"] for row in rows} == schemes
    for row in rows:
        assert row["err"] < 1e-2, row  # fp16 rounding; a missing or extra rank-r term is O(1)
