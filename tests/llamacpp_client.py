"""The real llama.cpp for tests: node-llama-cpp 3.21.1's prebuilt CPU build, run by ``tests/llamacpp/run.mjs``.

``scripts/test.sh`` installs it (``scripts/install_llamacpp.sh``: ``npm ci`` from the pinned lock,
the linux-x64 binary package only, no install scripts, nothing built or downloaded at run time).
:func:`require_llamacpp` skips with the reason when it is not installed, unless
``FASTFT_REQUIRE_LLAMACPP=1`` (set by scripts/test.sh) turns the missing client into a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

LLAMACPP_DIR = Path(__file__).parent / "llamacpp"
PACKAGE = LLAMACPP_DIR / "node_modules" / "node-llama-cpp" / "package.json"
BINARY_PACKAGE = LLAMACPP_DIR / "node_modules" / "@node-llama-cpp" / "linux-x64" / "package.json"


def missing_reason() -> str | None:
    if shutil.which("node") is None:
        return "node is not on PATH"
    for package in (PACKAGE, BINARY_PACKAGE):
        if not package.exists():
            return f"{package} is missing (run scripts/install_llamacpp.sh)"
    return None


def require_llamacpp() -> None:
    reason = missing_reason()
    if reason is None:
        return
    if os.environ.get("FASTFT_REQUIRE_LLAMACPP") == "1":
        pytest.fail(f"llama.cpp (node-llama-cpp) is a declared test dependency: {reason}")
    pytest.skip(f"llama.cpp check skipped: {reason}; scripts/test.sh installs it and sets FASTFT_REQUIRE_LLAMACPP=1")


def llamacpp(jobs: list[dict], timeout: float = 300) -> list[dict]:
    """Run ``jobs`` (see tests/llamacpp/run.mjs) in one node process; one answer per job."""
    require_llamacpp()
    env = dict(os.environ, NODE_LLAMA_CPP_SKIP_DOWNLOAD="true")
    result = subprocess.run(
        ["node", str(LLAMACPP_DIR / "run.mjs")],
        input=json.dumps({"jobs": jobs}),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,  # the error is raised below with node's stderr
        env=env,
        cwd=LLAMACPP_DIR,
    )
    if result.returncode != 0:
        raise RuntimeError(f"llama.cpp run failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout)["results"]
