"""The GPU check's report (benchmarks/gpu_check_report.py): the phases add up to the step, and a part that timed
out, failed or never ran is reported as such and never as a pass."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report_module():
    spec = importlib.util.spec_from_file_location("gpu_check_report", ROOT / "benchmarks" / "gpu_check_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_phases_sum_to_the_step_and_missing_parts_are_never_a_pass(tmp_path, report_module):
    phases = {"condition": 0.1, "diff_loss": 0.1, "sampling": 0.5, "grad_step": 0.2, "decode": 0.1, "reward": 0.3,
              "detection": 0.1, "embedding": 0.15, "backward": 0.4, "step": 2.0}
    _write(tmp_path / "train_step.json", {
        "size": "tiny", "device": "cpu", "settings": {},
        "results": {"plain": {"phases_s": phases, "peak_memory_gib": 1.0},
                    "kv_cache": [{"scenario": "small", "speedup": 2.0}, {"scenario": "real", "speedup": 1.2}]}})
    _write(tmp_path / "train_step.status.json", {"rc": 0, "seconds": 5})
    _write(tmp_path / "reward.status.json", {"rc": 124, "seconds": 300})  # timed out
    _write(tmp_path / "ddp.status.json", {"rc": 1, "seconds": 3})  # failed; detect never ran

    report = report_module.collect(tmp_path, seconds=10, dry_run=True)
    step = report["parts"]["train_step"]
    # other = 2.0 - (0.1 + 0.1 + 0.5 + 0.2 + 0.1 + 0.3 + 0.4) = 0.3; detection and embedding sit inside reward
    assert step["phases_s"]["other"] == pytest.approx(0.3)
    assert step["phase_share"]["sampling"] == pytest.approx(0.25)
    assert step["dominant_phase"] == "sampling"
    # the KV cache goal is judged on the last (largest) scenario, which misses it
    assert step["kv_cache"] == {"scenario": "real", "speedup": 1.2, "goal": 1.3, "passed": False}

    parts = report["parts"]
    assert parts["reward"]["status"]["why"] == "past its time limit" and "passed" not in parts["reward"]
    assert parts["detection"]["status"]["why"] == "not run" and "cpu" not in parts["detection"]
    assert parts["ddp_smoke"]["status"]["why"].startswith("exit 1") and "passed" not in parts["ddp_smoke"]

    text = report_module.table(report)
    assert "dominant phase: sampling" in text and "  other          0.3000 s  15.0%" in text
    assert "reference KV cache (real): 1.20x (goal >= 1.3x: FAIL)" in text
    assert "reward: not measured: past its time limit" in text
    assert "face detection: not measured: not run" in text
    assert "DDP smoke: not measured: exit 1" in text
    assert "PASS" not in text
