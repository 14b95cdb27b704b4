"""benchmarks/harness.py's allocator-trace reading: what was live at the peak, grouped by where."""

from pathlib import Path

from helpers import load_script

harness = load_script(Path(__file__).parents[1] / "benchmarks" / "harness.py")


def _frames(*names):
    return [{"filename": f"/site-packages/{name}", "line": line, "name": "f"} for line, name in enumerate(names, 1)]


def test_live_at_peak_groups_the_allocations_live_at_the_most_memory():
    kernel = _frames("torch/_tensor.py", "lightning_fastft/kernels/moe.py")  # innermost frame first
    model = _frames("transformers/models/qwen3_moe/modeling_qwen3_moe.py")
    events = [
        {"action": "alloc", "addr": 1, "size": 100 * 2**20, "frames": kernel},
        {"action": "alloc", "addr": 2, "size": 50 * 2**20, "frames": model},
        {"action": "free_requested", "addr": 1, "size": 100 * 2**20},  # not yet given back: still counted
        {"action": "alloc", "addr": 3, "size": 30 * 2**20, "frames": kernel},  # 180 MiB
        {"action": "free_completed", "addr": 1, "size": 100 * 2**20},
        {"action": "alloc", "addr": 4, "size": 120 * 2**20, "frames": model},  # 200 MiB at one moment...
        {"action": "free_completed", "addr": 9, "size": 500 * 2**20},  # ...a block from before the trace: ignored
    ]
    peak, rows = harness.live_at_peak(events)
    assert peak == 200 * 2**20
    assert rows == [
        {"where": "transformers/models/qwen3_moe/modeling_qwen3_moe.py:1 f", "mib": 170.0, "count": 2},
        {"where": "lightning_fastft/kernels/moe.py:2 f", "mib": 30.0, "count": 1},
    ]
    _, before = harness.live_at_peak(events[:4])
    assert before == [
        {"where": "lightning_fastft/kernels/moe.py:2 f", "mib": 130.0, "count": 2},
        {"where": "transformers/models/qwen3_moe/modeling_qwen3_moe.py:1 f", "mib": 50.0, "count": 1},
    ]
