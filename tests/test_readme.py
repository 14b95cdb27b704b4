"""The README's Python example runs as a user would run it: a fresh process, no Triton interpreter."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


@pytest.mark.subprocess
@pytest.mark.slow
def test_readme_example_runs_quietly(tmp_path):
    example = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    script = tmp_path / "readme_example.py"
    script.write_text(example)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    finished = subprocess.run(
        [sys.executable, "-W", "always", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output[-3000:]
    assert "lightning_fastft patching report" in output
    assert "Epoch 0/0" in output and "/-" not in output  # the progress bar knows the epoch count
    assert len(re.findall(r"runs its PyTorch reference", output)) == 1  # one CPU-fallback line
    assert "FastFTMetrics: no peak" not in output  # a CPU has no MFU to miss
    assert not re.search(r"(Future|Deprecation)Warning.*(past_key_values|lightning_fastft)", output), output[-3000:]
