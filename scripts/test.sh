#!/usr/bin/env bash
# Set up (CPU torch first, then the project with its dev extra, pinned by the lock constraints.txt)
# and run the test-suite; then the Hugging Face-facing tests again against the oldest transformers
# and peft of the tested window (scripts/test_oldest.sh). Arguments go to the first pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -c constraints.txt -e ".[dev]"
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pytest -q tests "$@"
bash scripts/test_oldest.sh
