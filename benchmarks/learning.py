"""Learning quality of textual inversion on the shipped toy model: method x step budget -> reconstruction,
editability, wall time and steps/s, averaged over held-out concepts and seeds (95% intervals over seeds).

For each (method, concept, seed) one run trains to the largest budget; the vectors at every budget (and the initial
ones, budget 0) are written as embedding files, loaded with diffusers' ``load_textual_inversion`` and judged
(``embedding_trainer/toyworld/learning.py``). Prints the table and writes ``learning.csv`` (one row per run and
budget), ``learning-summary.csv`` and ``learning.png`` (reconstruction against editability, one line per method
through its budgets, as in the textual-inversion paper). Examples::

    python benchmarks/learning.py --short                 # one concept, one seed, budgets 0/25/100: a few minutes
    python benchmarks/learning.py --out bench-out         # every concept and method, 3 seeds, 25..400 steps
    python benchmarks/learning.py --jobs 2 --threads 1    # the same, two runs at a time (one per core)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedding_trainer.hosts.diffusers_host import DiffusersHost  # noqa: E402
from embedding_trainer.toyworld import learning, world  # noqa: E402
from embedding_trainer.toyworld.base_model import load_model  # noqa: E402
from embedding_trainer.toyworld.judges import load_judges  # noqa: E402

COLUMNS = ("method", "concept", "seed", "steps", "reconstruction", "editability", "images", "train_s", "steps_per_s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=learning.SHIPPED_MODEL, help="diffusers folder of the toy model")
    p.add_argument("--methods", nargs="*", default=list(learning.METHODS), choices=list(learning.METHODS))
    p.add_argument(
        "--method", nargs=2, action="append", default=[], metavar=("NAME", "JSON"),
        help="also run a method of your own: TrainConfig fields over the defaults, e.g. x '{\"batch_size\": 2}'",
    )  # fmt: skip
    p.add_argument(
        "--concepts", nargs="+", default=list(world.HELD_OUT_CONCEPTS), choices=list(world.HELD_OUT_CONCEPTS)
    )
    p.add_argument("--budgets", nargs="+", type=int, default=[25, 50, 100, 200, 400])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch threads per job (default: torch's choice)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, one process each (e.g. 2 x --threads 1)")
    p.add_argument("--out", type=Path, default=Path("bench-learning"))
    p.add_argument("--short", action="store_true", help="one concept, one seed, budgets 25 and 100, two methods")
    args = p.parse_args(argv)
    if args.short:
        args.concepts, args.seeds, args.budgets = args.concepts[:1], args.seeds[:1], [25, 100]
        args.methods = args.methods[:2]
    args.runs = [learning.METHODS[name] for name in args.methods]
    for name, fields in args.method:
        try:
            args.runs.append(learning.Method(name, json.loads(fields), "from --method"))
        except json.JSONDecodeError as error:
            p.error(f"--method {name}: {fields!r} is not JSON ({error})")
    if not args.runs:
        p.error("no methods: name some with --methods or give --method NAME JSON")
    return args


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over concepts per (method, seed, steps), then mean and 95% interval over seeds."""
    by_seed: dict[tuple[str, int, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_seed[(row["method"], row["steps"], row["seed"])].append(row)
    per_seed: dict[tuple[str, int], list[dict[str, float]]] = defaultdict(list)
    for (method, steps, _), group in by_seed.items():
        per_seed[(method, steps)].append({k: sum(r[k] for r in group) / len(group) for k in COLUMNS[4:]})
    summary = []
    for (method, steps), seeds in sorted(per_seed.items()):
        entry: dict[str, Any] = {"method": method, "steps": steps, "seeds": len(seeds)}
        for key in ("reconstruction", "editability", "train_s", "steps_per_s"):
            mean, half = learning.mean_and_interval([s[key] for s in seeds])
            entry[key], entry[f"{key}_ci95"] = mean, half
        summary.append(entry)
    return summary


def print_table(summary: list[dict[str, Any]]) -> None:
    print(f"{'method':<16} {'steps':>5} {'reconstruction':>16} {'editability':>16} {'train s':>8} {'steps/s':>8}")
    for e in summary:
        print(
            f"{e['method']:<16} {e['steps']:>5} {e['reconstruction']:>8.3f} ±{e['reconstruction_ci95']:.3f}"
            f" {e['editability']:>8.3f} ±{e['editability_ci95']:.3f} {e['train_s']:>8.1f} {e['steps_per_s']:>8.2f}"
        )


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    """Reconstruction (x) against editability (y), one polyline per method through its budgets."""
    size, margin = 560, 60
    image = Image.new("RGB", (size + 160, size), "white")
    draw = ImageDraw.Draw(image)
    span = size - 2 * margin

    def xy(x: float, y: float) -> tuple[float, float]:
        return margin + x * span, size - margin - y * span

    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x, y = xy(tick, 0)
        draw.text((x - 8, y + 6), f"{tick:.2f}", fill="black")
        x, y = xy(0, tick)
        draw.text((x - 40, y - 6), f"{tick:.2f}", fill="black")
    draw.text((margin + span // 2 - 50, size - 24), "reconstruction", fill="black")
    draw.text((6, 14), "editability", fill="black")
    colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    methods = sorted({e["method"] for e in summary})
    for index, method in enumerate(methods):
        colour = colours[index % len(colours)]
        points = [e for e in summary if e["method"] == method]
        coords = [xy(e["reconstruction"], e["editability"]) for e in points]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        for (x, y), e in zip(coords, points):
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
            draw.text((x + 5, y - 12), str(e["steps"]), fill=colour)
        draw.text((size + 10, 40 + 18 * index), method, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


#: Per-process state of a benchmark worker: the model, its host and the judges, loaded once.
_WORKER: dict[str, Any] = {}


def _start_worker(model: Path, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    _WORKER.update(model=load_model(model), host=DiffusersHost.from_pretrained(model), judges=load_judges())


def _run_one(task: tuple[learning.Method, str, int, list[int], int, Path]) -> tuple[list[dict[str, Any]], str]:
    """Train and score one (method, concept, seed); returns its CSV rows and a progress line."""
    method, concept_name, seed, budgets, images_per_prompt, work = task
    run = learning.evaluate_concept(
        _WORKER["model"], _WORKER["host"], _WORKER["judges"], world.HELD_OUT_CONCEPTS[concept_name],
        method, budgets, work, seed=seed, images_per_prompt=images_per_prompt,
    )  # fmt: skip
    rows = [
        {"method": method.name, "concept": concept_name, "seed": seed, "steps": steps,
         "reconstruction": scores.reconstruction, "editability": scores.editability, "images": scores.images,
         "train_s": run.train_s * steps / max(budgets), "steps_per_s": run.steps_per_s}
        for steps, scores in sorted(run.scores.items())
    ]  # fmt: skip
    last = run.scores[max(budgets)]
    line = (
        f"{method.name} {concept_name} seed {seed}: {run.steps_per_s:.1f} steps/s, at {max(budgets)} steps "
        f"reconstruction {last.reconstruction:.2f}, editability {last.editability:.2f}"
    )
    return rows, line


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="embtrain-learning-") as tmp:
        tasks = [
            (method, concept, seed, args.budgets, args.images_per_prompt, Path(tmp) / f"{method.name}-{concept}-{seed}")
            for method in args.runs
            for concept in args.concepts
            for seed in args.seeds
        ]
        with contextlib.ExitStack() as stack:
            if args.jobs == 1:
                _start_worker(args.model, args.threads)
                results = map(_run_one, tasks)
            else:  # one process per job, each with its own model copy and --threads threads
                pool = stack.enter_context(ProcessPoolExecutor(
                    args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                    initargs=(args.model, args.threads),
                ))  # fmt: skip
                results = pool.map(_run_one, tasks)
            for task_rows, line in results:
                rows.extend(task_rows)
                print(line, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "learning.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise(rows)
    with open(args.out / "learning-summary.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    plot(summary, args.out / "learning.png")
    threads = args.threads or torch.get_num_threads()
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.jobs} job(s) of {threads} thread(s)"
    )
    print(f"\n{machine}, {datetime.date.today()}, {time.perf_counter() - started:.0f} s in all")
    print_table(summary)
    print(f"\nwrote {args.out / 'learning.csv'}, {args.out / 'learning-summary.csv'}, {args.out / 'learning.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
