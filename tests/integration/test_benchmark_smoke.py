"""The speed benchmark's quick form runs and prints a table with an ours/bare ratio per row."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_benchmark_prints_ratios(tmp_path: Path):
    csv_path = tmp_path / "speed.csv"
    # One torch thread: on a shared 2-core machine two threads can make the tiny steps 10x slower.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.speed",
            "--quick",
            "--threads",
            "1",
            "--steps",
            "2",
            "--repeats",
            "2",
            "--csv",
            str(csv_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "ratio" in line and "ours s/step" in line)
    assert header.split("|")[-1].strip() == "ratio"
    rows = [line for line in lines if line.strip().startswith("tiny |")]
    assert len(rows) == 2  # batch 1 and batch 4
    for row in rows:
        ratio = row.split("|")[-1].strip()
        assert re.fullmatch(r"\d+\.\d\d", ratio) and float(ratio) > 0, row
    assert csv_path.read_text().startswith("arch,resolution,batch")
