#!/usr/bin/env bash
# Set up (CPU torch first, then the project with its dev extra) and run the test-suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[dev]"
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pytest -q tests "$@"
