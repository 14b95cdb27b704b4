#!/usr/bin/env bash
# The Axolotl plugin against the real axolotl package, in a venv of its own (axolotl's pins clash
# with the main lock): layered over the current environment (torch and everything of
# constraints.txt, as scripts/test.sh installed it), it gets axolotl and the
# packages it imports, --no-deps, from constraints-axolotl.txt, and this checkout of
# lightning_fastft. Runs tests/test_axolotl.py there (FASTFT_REQUIRE_AXOLOTL=1: axolotl must import).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FASTFT_AXOLOTL_VENV:-.venv-axolotl}"
python3 -m venv --system-site-packages "$venv"
# --system-site-packages layers over the base interpreter only: when python3 is itself a venv (a fresh
# venv set up as the README says), a .pth file layers over that environment too (after the new venv's own)
python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' >"$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_fastft_parent_env.pth"
"$venv/bin/python" -m pip install -q --no-deps -r constraints-axolotl.txt
"$venv/bin/python" -m pip install -q --no-deps -e .
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false AXOLOTL_DO_NOT_TRACK=1 FASTFT_REQUIRE_AXOLOTL=1
"$venv/bin/python" -m pytest -q tests/test_axolotl.py
