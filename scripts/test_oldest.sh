#!/usr/bin/env bash
# The oldest end of the tested window: a venv layered over the current environment
# (--system-site-packages) gets constraints-oldest.txt (the lower bounds of transformers and peft
# in pyproject.toml, resolved), then the tests of everything that touches Hugging Face code run.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FASTFT_OLDEST_VENV:-.venv-oldest}"
python3 -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q -c constraints-oldest.txt -e ".[dev]"
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$venv/bin/python" -m pytest -q tests/test_patching.py tests/test_generation.py tests/test_packing.py \
    tests/test_convergence.py tests/test_lora.py tests/test_checkpoint.py tests/test_versions.py \
    tests/test_integrations_hf.py tests/test_moe.py tests/test_moe_gpt_oss.py tests/test_gguf_formats.py tests/test_gguf_llamacpp.py
"$venv/bin/python" -m pytest -q -m "not slow" tests/test_rl_module.py
