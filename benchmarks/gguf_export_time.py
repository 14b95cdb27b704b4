"""Wall time of ``export_gguf`` for a model shape with random bf16 weights (goal: Llama-3-8B at q4_k_m in
at most 2 minutes on a 16-core machine).

    python benchmarks/gguf_export_time.py --shape llama8b --dtype q4_k_m --out benchmarks/results/gguf_export_time_8b
    python benchmarks/gguf_export_time.py --shape llama1b --layers 4 --dtype q4_k_m q8_0 f16

The model is built on the meta device and filled with N(0, 0.02) bf16 values (no slow initialisers);
the GGUF goes to ``--workdir`` (a temporary folder by default; about 4.9 GB for 8B q4_k_m) and is
deleted after each run. Rows: shape, parameters, dtype, torch threads, CPUs, export seconds, file size.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def random_bf16_model(shape: str, layers: int | None):
    from transformers import AutoModelForCausalLM

    config = harness.model_config(shape, layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                parameter.fill_(1.0)  # norms
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    model.tie_weights()
    return model.eval()


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama8b", choices=sorted(harness.SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the shape has")
    parser.add_argument("--dtype", nargs="+", default=["q4_k_m"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None, help="results path: <out>.json and <out>.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from lightning_fastft.export import export_gguf

    started = time.perf_counter()
    model = random_bf16_model(args.shape, args.layers)
    build_s = time.perf_counter() - started
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.shape} ({n_params / 1e9:.2f} B parameters) built in {build_s:.1f} s, {torch.get_num_threads()} threads")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        for dtype in args.dtype:
            path = Path(folder) / f"model-{dtype}.gguf"
            with harness.Stopwatch() as watch:
                export_gguf(model, path, dtype=dtype)
            size = path.stat().st_size
            path.unlink()
            row = {
                "shape": args.shape + (f" ({args.layers} layers)" if args.layers else ""),
                "params_b": round(n_params / 1e9, 3),
                "dtype": dtype,
                "threads": torch.get_num_threads(),
                "cpus": os.cpu_count(),
                "export_s": round(watch.seconds, 1),
                "file_gb": round(size / 1e9, 2),
            }
            print(row)
            rows.append(row)
    if args.out:
        meta = harness.run_meta(build_s=round(build_s, 1))
        harness.write_results(
            Path(args.out).with_suffix(".json"),
            f"GGUF export time ({args.shape}, random bf16 weights)",
            meta,
            rows,
            ["shape", "params_b", "dtype", "threads", "cpus", "export_s", "file_gb"],
            notes=["Goal: Llama-3-8B at q4_k_m in at most 120 s on a 16-core machine."],
            integers_from=1e6,
        )
    return rows


if __name__ == "__main__":
    main()
