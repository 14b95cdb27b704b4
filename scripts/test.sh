#!/usr/bin/env bash
# Set up (CPU torch first, then the project with its dev extra, pinned by the lock constraints.txt)
# and run the test-suite; then the Hugging Face-facing tests again against the oldest transformers
# and peft of the tested window (scripts/test_oldest.sh), and the Axolotl plugin against the real
# axolotl in its own venv (scripts/test_axolotl.sh). Arguments go to the first pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -c constraints.txt -e ".[dev]"
bash scripts/install_llamacpp.sh  # the real llama.cpp for the GGUF tests (node-llama-cpp, pinned)
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export FASTFT_REQUIRE_LLAMACPP=1  # a missing llama.cpp fails the GGUF tests instead of skipping them
python3 -m pytest -q tests "$@"
bash scripts/test_oldest.sh
bash scripts/test_axolotl.sh
