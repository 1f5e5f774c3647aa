"""The learning benchmark runs end to end on the shipped toy model (two parallel jobs, a two-step budget, a concept
whose word it erases for the run) and writes its tables, CSVs and plot; ``--from-csv`` summarises them again."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
BENCHMARK = [sys.executable, "-m", "benchmarks.learning"]  # run from the repository root


@pytest.mark.slow
def test_learning_benchmark_writes_table_csv_and_plot(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *BENCHMARK,
            "--concepts",
            "purple",
            "--methods",
            "ours",
            "webui-defaults",
            "--seeds",
            "0",
            "--budgets",
            "2",
            "--images-per-prompt",
            "1",
            "--jobs",
            "2",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reconstruction" in result.stdout and "2 job(s) of 1 thread(s)" in result.stdout, result.stdout
    with open(tmp_path / "learning.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    # Both methods, scored at the initial vectors (step 0) and at the budget, each on 10 images (2 + 8 prompts).
    assert sorted((r["method"], int(r["steps"])) for r in rows) == [
        ("ours", 0),
        ("ours", 2),
        ("webui-defaults", 0),
        ("webui-defaults", 2),
    ]
    assert all(int(r["images"]) == 10 and 0.0 <= float(r["reconstruction"]) <= 1.0 for r in rows)
    summary = (tmp_path / "learning-summary.csv").read_text(encoding="utf-8").splitlines()
    assert summary[0].startswith("method,steps,seeds,reconstruction") and len(summary) == 5
    assert (tmp_path / "learning.png").stat().st_size > 1000
    assert all(r["leakage"] and r["held_out_loss"] for r in rows)  # leakage judged; the score of each judged vector
    assert "| ours | 2 |" in (tmp_path / "learning.md").read_text(encoding="utf-8")
    again = subprocess.run(
        [*BENCHMARK, "--from-csv", str(tmp_path / "learning.csv"), "--out", str(tmp_path / "again")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "again" / "learning-summary.csv").read_text(encoding="utf-8") == "\n".join(summary) + "\n"


def test_the_same_photos_check_counts_the_lowest_scores_picks_and_pairs() -> None:
    from benchmarks import learning as bench

    def row(concept: str, seed: int, steps: int, loss: float, recon: float) -> dict:
        return {"concept": concept, "seed": seed, "steps": steps, "held_out_loss": loss, "reconstruction": recon}

    rows = [
        row("heart", 0, 0, 0.1, 0.0),  # step 0: never a candidate
        row("heart", 0, 100, 0.3, 1.0),
        row("heart", 0, 200, 0.5, 0.0),
        row("heart", 0, 200, 0.4, 0.0),
        row("moon", 0, 100, 0.2, 0.0),
        row("moon", 0, 200, 0.6, 1.0),  # the lowest score did not find it
        row("dots", 0, 100, 0.2, 1.0),
        row("dots", 0, 200, 0.1, 1.0),  # all found: not a mixed set
    ]
    assert bench.same_photos_choice(rows) == {
        "mixed_photo_sets": 2,
        "lowest_score_found": 1,
        "pairs": 3,
        "pairs_ordered_right": 2,
    }
