#!/usr/bin/env bash
# Set up (torch first, then the project) and run the demo fine-tune (no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -c constraints.txt -e .
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 examples/demo.py "$@"
