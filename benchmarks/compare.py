"""Two commits' speed side by side: a benchmark run alternately from each commit's tree, in one invocation.

Each side is the commit's files (``git archive``) in a scratch folder, run with that folder first on ``PYTHONPATH``
so it imports its own ``embedding_trainer`` (not the installed one). Rounds alternate the order (base, head, then
head, base, ...) so drift in the machine's load lands on both sides alike. For ``speed`` the rows are compared by
their settings; for ``webui_speed`` by model and batch. Printed per row: each side's median step time over the
rounds, head/base, and each side's step time against the bound its own run measured (the bound is the same code on
both sides, so it shows the machine's state). Examples::

    python -m benchmarks.compare --base 3767142 speed -- --quick
    EMBTRAIN_WEBUI_DIR=... EMBTRAIN_WEBUI_PYTHON=... python -m benchmarks.compare --base 3767142 webui_speed -- \\
        --steps 40 --repeats 2 --batches 1 4
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ("speed", "webui_speed")


def export_tree(ref: str, folder: Path) -> Path:
    """The files of commit ``ref`` in ``folder`` (no git state, nothing checked out in this repository)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    folder.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def benchmark_command(tree: Path, name: str) -> list[str]:
    """How that tree runs its benchmark: as a module where ``benchmarks`` is a package, else as a script."""
    if (tree / "benchmarks" / "__init__.py").is_file():
        return [sys.executable, "-m", f"benchmarks.{name}"]
    return [sys.executable, str(tree / "benchmarks" / f"{name}.py")]


def run_side(tree: Path, name: str, extra: list[str], out: Path) -> None:
    output = ["--csv", str(out / "speed.csv")] if name == "speed" else ["--out", str(out)]
    path = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    out.mkdir(parents=True)
    with open(out / "log.txt", "w", encoding="utf-8") as log:
        done = subprocess.run(
            [*benchmark_command(tree, name), *extra, *output], cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    if done.returncode:
        raise SystemExit(f"{name} failed in {tree} (exit {done.returncode}); its output: {out / 'log.txt'}")


def read_rows(name: str, out: Path) -> dict[str, tuple[float, float]]:
    """``{row: (our step seconds, bound step seconds)}`` from one run's output."""
    rows: dict[str, tuple[float, float]] = {}
    if name == "speed":
        with open(out / "speed.csv", encoding="utf-8") as handle:
            for r in csv.DictReader(handle):
                ckpt = "on" if r["checkpointing"] == "True" else "off"
                key = f"{r['arch']} {r['resolution']} px, batch {r['batch']}, {r['precision']}, checkpointing {ckpt}"
                rows[key] = (float(r["ours_s"]), float(r["bare_s"]))
        return rows
    for result in json.loads((out / "webui_speed.json").read_text(encoding="utf-8")):
        for batch, entry in result["batches"].items():
            bound = entry["bound"]["encode_unet"]["median_ms"] / 1000
            rows[f"{result['family']}, batch {batch}"] = (entry["ours_step_ms"] / 1000, bound)
    return rows


def compare(samples: dict[str, dict[str, list[tuple[float, float]]]]) -> str:
    lines = [
        "| row | base s/step | head s/step | head / base | base / bound | head / bound |",
        "|---|---|---|---|---|---|",
    ]
    for key in samples["base"]:
        if key not in samples["head"]:
            continue
        base, head = samples["base"][key], samples["head"][key]
        base_s, head_s = statistics.median(s for s, _ in base), statistics.median(s for s, _ in head)
        base_b = statistics.median(s / b for s, b in base)
        head_b = statistics.median(s / b for s, b in head)
        lines.append(f"| {key} | {base_s:.4f} | {head_s:.4f} | {head_s / base_s:.3f} | {base_b:.2f} | {head_b:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the earlier commit (a git ref)")
    parser.add_argument("--head", default="HEAD", help="the later commit (default HEAD)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating (default 2)")
    parser.add_argument("--keep", type=Path, help="keep every run's output in this folder")
    parser.add_argument("benchmark", choices=BENCHMARKS)
    parser.add_argument("options", nargs=argparse.REMAINDER, help="after --: the benchmark's own options")
    args = parser.parse_args(argv)
    extra = args.options[1:] if args.options[:1] == ["--"] else args.options
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    with tempfile.TemporaryDirectory(prefix="embtrain-compare-") as scratch:
        work = args.keep or Path(scratch)
        refs = {"base": args.base, "head": args.head}
        trees = {side: export_tree(ref, Path(scratch) / side) for side, ref in refs.items()}
        samples: dict[str, dict[str, list[tuple[float, float]]]] = {"base": {}, "head": {}}
        for round_ in range(args.rounds):
            for side in ("base", "head") if round_ % 2 == 0 else ("head", "base"):
                out = work / f"{side}-{round_ + 1}"
                print(f"round {round_ + 1}: {side} ({refs[side]})", flush=True)
                run_side(trees[side], args.benchmark, extra, out)
                for key, value in read_rows(args.benchmark, out).items():
                    samples[side].setdefault(key, []).append(value)
    print(
        f"{args.benchmark} {' '.join(extra)}: base {args.base}, head {args.head}, {args.rounds} round(s) each, "
        "medians over the rounds"
    )
    print(compare(samples))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
