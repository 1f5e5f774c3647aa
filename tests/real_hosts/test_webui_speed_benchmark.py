"""Opt-in: the WebUI speed benchmark runs end to end against a real WebUI (short runs; no speed is asserted).

Needs ``EMBTRAIN_WEBUI_DIR`` and ``EMBTRAIN_WEBUI_PYTHON`` like the real-host tier (see ``webui.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.webui import MISSING, PYTHON, WEBUI

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not (WEBUI and PYTHON), reason=MISSING)


def test_the_benchmark_times_both_trainers_and_the_bound_in_one_webui(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "benchmarks.webui_speed",
        "--steps",
        "14",
        "--skip",
        "3",
        "--repeats",
        "1",
        "--batches",
        "1",
        "--bound-steps",
        "3",
        "--idle-team",
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| sd1")]
    assert len(rows) == 2, result.stdout[-3000:]  # plain, then beside an idle OpenMP team
    results = json.loads((tmp_path / "webui_speed.json").read_text())
    for run in results:
        entry = run["batches"]["1"]
        assert entry["ours_step_ms"] > 0 and entry["builtin_step_ms"] > 0 and entry["speedup_vs_builtin"] > 0
        assert entry["bound"]["encode_unet"]["median_ms"] > 0 and entry["bound"]["unet"]["median_ms"] > 0
        assert entry["ours_cpu_threads"] and all("CPU thread" in s for s in entry["ours_cpu_threads"])
    assert "Load average" in result.stdout
