"""The two-commit comparison reads each benchmark's output, pairs the rows and prints head / base."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import compare

ROOT = Path(__file__).resolve().parents[2]


def write_speed_csv(folder: Path, ours: float, bare: float) -> None:
    folder.mkdir(parents=True)
    with open(folder / "speed.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(
            handle, ["arch", "resolution", "batch", "precision", "checkpointing", "ours_s", "bare_s"]
        )
        writer.writeheader()
        writer.writerow(
            dict(arch="tiny", resolution=64, batch=4, precision="fp32", checkpointing=False, ours_s=ours, bare_s=bare)
        )


def test_speed_rows_are_paired_by_their_settings_and_compared_as_medians(tmp_path: Path) -> None:
    samples: dict[str, dict[str, list[tuple[float, float]]]] = {"base": {}, "head": {}}
    for side, times in (("base", (0.020, 0.022, 0.030)), ("head", (0.021, 0.023, 0.010))):
        for index, ours in enumerate(times):
            write_speed_csv(tmp_path / f"{side}-{index}", ours, 0.010)
            for key, value in compare.read_rows("speed", tmp_path / f"{side}-{index}").items():
                samples[side].setdefault(key, []).append(value)
    table = compare.compare(samples)
    row = table.splitlines()[-1]
    assert row.startswith("| tiny 64 px, batch 4, fp32, checkpointing off |")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:] == ["0.0220", "0.0210", f"{0.021 / 0.022:.3f}", "2.20", "2.10"]


def test_webui_rows_are_read_per_model_and_batch_with_the_runs_own_bound(tmp_path: Path) -> None:
    result = [
        {"family": "sd1", "batches": {"4": {"ours_step_ms": 60.0, "bound": {"encode_unet": {"median_ms": 50.0}}}}}
    ]
    (tmp_path / "webui_speed.json").write_text(json.dumps(result), encoding="utf-8")
    assert compare.read_rows("webui_speed", tmp_path) == {"sd1, batch 4": (0.060, 0.050)}


def test_a_tree_runs_its_benchmark_as_a_module_or_as_an_older_script(tmp_path: Path) -> None:
    (tmp_path / "benchmarks").mkdir()
    assert compare.benchmark_command(tmp_path, "speed")[1:] == [str(tmp_path / "benchmarks" / "speed.py")]
    (tmp_path / "benchmarks" / "__init__.py").touch()
    assert compare.benchmark_command(tmp_path, "speed")[1:] == ["-m", "benchmarks.speed"]


def test_an_exported_tree_is_that_commits_files(tmp_path: Path) -> None:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        pytest.skip("not a git checkout")
    tree = compare.export_tree("HEAD", tmp_path / "head")
    committed = subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:pyproject.toml"], capture_output=True).stdout
    assert (tree / "pyproject.toml").read_bytes() == committed
    assert not (tree / ".git").exists()


def test_the_command_line_needs_a_base_and_a_known_benchmark() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", "nonsense"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "--base" in done.stderr
