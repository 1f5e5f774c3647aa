"""Learning quality of textual inversion on the shipped toy model: method x step budget -> reconstruction,
editability, wall time and steps/s, averaged over held-out concepts and seeds (95% intervals over seeds).

For each (method, concept, seed) one run trains to the largest budget; the vectors at every budget (and the initial
ones, budget 0) are written as embedding files, loaded with diffusers' ``load_textual_inversion`` and judged
(``embedding_trainer/toyworld/learning.py``). Prints the table and writes ``learning.csv`` (one row per run and
budget), ``learning-summary.csv`` and ``learning.png`` (reconstruction against editability, one line per method
through its budgets, as in the textual-inversion paper). Examples::

    python -m benchmarks.learning --short                 # one concept, one seed, budgets 0/25/100: a few minutes
    python -m benchmarks.learning --out bench-out         # every concept and method, 3 seeds, 25..400 steps
    python -m benchmarks.learning --jobs 2 --threads 1    # the same, two runs at a time (one per core)
    python -m benchmarks.learning --own-words --out words # no training: the concepts' own words, the bound
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

from embedding_trainer.hosts.diffusers_host import DiffusersHost  # noqa: E402
from embedding_trainer.toyworld import learning, world  # noqa: E402
from embedding_trainer.toyworld.base_model import load_model  # noqa: E402
from embedding_trainer.toyworld.judges import load_judges  # noqa: E402

COLUMNS = (
    "method",
    "concept",
    "seed",
    "steps",
    "reconstruction",
    "editability",
    "leakage",
    "leakage_above_0",
    "images",
    "train_s",
    "steps_per_s",
    "held_out_loss",
    "relative_loss",
    "vectors_step",
    "steps_trained",
    "init_choice",
)
#: Averaged per (method, seed, steps) over concepts, then over seeds.
MEASURES = ("reconstruction", "editability", "leakage_above_0", "train_s", "steps_per_s")
#: A concept counts as found in a run when its reconstruction reaches this.
FOUND = 0.5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=learning.SHIPPED_MODEL, help="diffusers folder of the toy model")
    p.add_argument(
        "--methods",
        nargs="*",
        default=["ours", "plain", "webui-defaults", "diffusers-example"],
        choices=list(learning.METHODS),
        help="named methods (learning.METHODS; 'ablation' adds every ablation step)",
    )
    p.add_argument("--ablation", action="store_true", help="also run every step of learning.ABLATION")
    p.add_argument(
        "--method",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "JSON"),
        help="also run a method of your own: TrainConfig fields over the defaults, e.g. x '{\"batch_size\": 2}'; "
        '"photo_captions": true gives the photos captions of their other attributes and appends them to the prompts '
        '("both": half the prompts put them before the trigger)',
    )
    p.add_argument(
        "--concepts", nargs="+", default=list(world.HELD_OUT_CONCEPTS), choices=list(world.HELD_OUT_CONCEPTS)
    )
    p.add_argument("--budgets", nargs="+", type=int, default=[50, 100, 200])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch threads per job (default: torch's choice)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, one process each (e.g. 2 x --threads 1)")
    p.add_argument("--out", type=Path, default=Path("bench-learning"))
    p.add_argument("--short", action="store_true", help="one concept, one seed, budgets 25 and 100, two methods")
    p.add_argument(
        "--own-words",
        action="store_true",
        help="train nothing: judge the same prompts with the concept's own words on the model as shipped (for the "
        "concepts that have them): how well any word for the concept can edit",
    )
    p.add_argument(
        "--from-csv",
        nargs="+",
        type=Path,
        default=[],
        metavar="CSV",
        help="train nothing: summarise the rows of earlier runs' learning.csv files together (e.g. two sessions)",
    )
    args = p.parse_args(argv)
    if args.short:
        args.concepts, args.seeds, args.budgets = args.concepts[:1], args.seeds[:1], [25, 100]
        args.methods = args.methods[:2]
    names = list(dict.fromkeys(args.methods + ([m.name for m in learning.ABLATION] if args.ablation else [])))
    args.runs = [learning.METHODS[name] for name in names]
    for name, fields in args.method:
        try:
            values = json.loads(fields)
        except json.JSONDecodeError as error:
            p.error(f"--method {name}: {fields!r} is not JSON ({error})")
        captions = values.pop("photo_captions", False)  # the photos' data, not a TrainConfig field
        args.runs.append(
            learning.Method(name, values, "from --method", captions=bool(captions), captions_first=captions == "both")
        )
    if not args.runs:
        p.error("no methods: name some with --methods or give --method NAME JSON")
    return args


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over concepts per (method, seed, steps), then mean and 95% interval over seeds; plus how many runs found
    each concept (reconstruction >= FOUND) and the worst concept's count."""
    by_seed: dict[tuple[str, int, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_seed[(row["method"], row["steps"], row["seed"])].append(row)
    per_seed: dict[tuple[str, int], list[dict[str, float]]] = defaultdict(list)
    for (method, steps, _), group in by_seed.items():
        per_seed[(method, steps)].append({k: _mean([r[k] for r in group]) for k in MEASURES})
    summary = []
    for (method, steps), seeds in sorted(per_seed.items()):
        entry: dict[str, Any] = {"method": method, "steps": steps, "seeds": len(seeds)}
        for key in MEASURES:
            mean, half = learning.mean_and_interval([s[key] for s in seeds if s[key] == s[key]] or [float("nan")])
            entry[key], entry[f"{key}_ci95"] = mean, half
        found = found_counts(rows, method, steps)
        entry["found"] = sum(f for f, _ in found.values())
        entry["runs"] = sum(n for _, n in found.values())
        entry["worst_concept"] = min(found.items(), key=lambda item: item[1][0] / item[1][1])[0] if found else ""
        entry["worst_found"] = "{}/{}".format(*found[entry["worst_concept"]]) if found else ""
        summary.append(entry)
    return summary


def _mean(values: list[float]) -> float:
    values = [v for v in values if v == v]  # leave out NaN (an edit set with no photo value to leak)
    return sum(values) / len(values) if values else float("nan")


def found_counts(rows: list[dict[str, Any]], method: str, steps: int) -> dict[str, tuple[int, int]]:
    """Per concept: (runs whose reconstruction reached FOUND, runs)."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in rows:
        if row["method"] == method and row["steps"] == steps:
            counts[row["concept"]][0] += row["reconstruction"] >= FOUND
            counts[row["concept"]][1] += 1
    return {concept: (found, n) for concept, (found, n) in counts.items()}


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else float("nan")


def score_correlations(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How well the held-out score tracks the judges' reconstruction: Spearman over every scored (run, budget) row
    (the raw loss, and the loss relative to the run's step 0, comparable across concepts), and the mean over runs of
    the correlation within one run's budgets (what choosing a checkpoint needs)."""
    scored = [r for r in rows if r["held_out_loss"] == r["held_out_loss"]]
    result: dict[str, Any] = {"rows": len(scored)}
    if len(scored) < 3:
        return result
    recon = [r["reconstruction"] for r in scored]
    result["raw"] = spearman([-r["held_out_loss"] for r in scored], recon)
    result["relative"] = spearman([-r["relative_loss"] for r in scored], recon)
    runs: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in scored:
        runs[(r["method"], r["concept"], r["seed"])].append(r)
    within = [
        spearman([-r["held_out_loss"] for r in group], [r["reconstruction"] for r in group])
        for group in runs.values()
        if len({r["reconstruction"] for r in group}) > 1 and len(group) > 2
    ]
    within = [w for w in within if w == w]
    result["within_runs"] = sum(within) / len(within) if within else float("nan")
    result["runs_with_varying_reconstruction"] = len(within)
    result["same_photos"] = same_photos_choice(scored)
    return result


def same_photos_choice(scored: list[dict[str, Any]]) -> dict[str, int]:
    """What ``starts`` relies on: among runs on the same photos (concept and seed) where some found the concept and
    some did not, does the lowest held-out score pick one that found it? Every method and budget >0 is a candidate
    (the score uses the same fixed views there); also the share of (found, not found) pairs the score orders right."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in scored:
        if r["steps"] > 0:
            groups[(r["concept"], r["seed"])].append(r)
    picks_found = mixed = pairs_right = pairs = 0
    for group in groups.values():
        found = [r["reconstruction"] >= FOUND for r in group]
        if all(found) or not any(found):
            continue
        mixed += 1
        picks_found += min(group, key=lambda r: r["held_out_loss"])["reconstruction"] >= FOUND
        hits = [r["held_out_loss"] for r, f in zip(group, found) if f]
        misses = [r["held_out_loss"] for r, f in zip(group, found) if not f]
        pairs += len(hits) * len(misses)
        pairs_right += sum(h < m for h in hits for m in misses)
    return {
        "mixed_photo_sets": mixed,
        "lowest_score_found": picks_found,
        "pairs": pairs,
        "pairs_ordered_right": pairs_right,
    }


def markdown(summary: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """The summary and the per-concept counts as Markdown tables (what RESULTS.md shows)."""
    lines = [
        "| method | steps | reconstruction | editability | leakage above step 0 | runs that found it | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        lines.append(
            f"| {e['method']} | {e['steps']} | {e['reconstruction']:.3f} ± {e['reconstruction_ci95']:.3f} "
            f"| {e['editability']:.3f} ± {e['editability_ci95']:.3f} "
            f"| {e['leakage_above_0']:+.3f} ± {e['leakage_above_0_ci95']:.3f} | {e['found']}/{e['runs']} "
            f"| {e['train_s']:.1f} |"
        )
    concepts = sorted({r["concept"] for r in rows}, key=[r["concept"] for r in rows].index)
    lines += ["", "| method | steps | " + " | ".join(concepts) + " |", "|---|---|" + "---|" * len(concepts)]
    for e in summary:
        if e["steps"] == 0:
            continue
        found = found_counts(rows, e["method"], e["steps"])
        cells = []
        for concept in concepts:
            group = [r for r in rows if (r["method"], r["steps"], r["concept"]) == (e["method"], e["steps"], concept)]
            recon = _mean([r["reconstruction"] for r in group])
            edit = _mean([r["editability"] for r in group])
            cells.append(f"{recon:.2f} / {edit:.2f} ({found[concept][0]}/{found[concept][1]})" if group else "")
        lines.append(f"| {e['method']} | {e['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_table(summary: list[dict[str, Any]]) -> None:
    print(
        f"{'method':<18} {'steps':>5} {'reconstruction':>16} {'editability':>16} {'leak above 0':>16} "
        f"{'found':>7} {'worst':>22} {'train s':>8}"
    )
    for e in summary:
        print(
            f"{e['method']:<18} {e['steps']:>5} {e['reconstruction']:>8.3f} ±{e['reconstruction_ci95']:.3f}"
            f" {e['editability']:>8.3f} ±{e['editability_ci95']:.3f}"
            f" {e['leakage_above_0']:>8.3f} ±{e['leakage_above_0_ci95']:.3f}"
            f" {e['found']:>3}/{e['runs']:<3} {e['worst_concept'] + ' ' + e['worst_found']:>22} {e['train_s']:>8.1f}"
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
        _WORKER["model"],
        _WORKER["host"],
        _WORKER["judges"],
        world.HELD_OUT_CONCEPTS[concept_name],
        method,
        budgets,
        work,
        seed=seed,
        images_per_prompt=images_per_prompt,
    )
    leak_0 = run.scores[0].leakage
    rows = [
        {
            "method": method.name,
            "concept": concept_name,
            "seed": seed,
            "steps": steps,
            "reconstruction": scores.reconstruction,
            "editability": scores.editability,
            "leakage": scores.leakage,
            "leakage_above_0": scores.leakage - leak_0,
            "images": scores.images,
            "train_s": run.train_s * min(steps, run.steps_trained) / max(run.steps_trained, 1),
            "steps_per_s": run.steps_per_s,
            "held_out_loss": scores.held_out_loss,
            "relative_loss": scores.held_out_loss / run.initial_loss,
            "vectors_step": scores.step,
            "steps_trained": min(steps, run.steps_trained),
            "init_choice": run.init_choice,
        }
        for steps, scores in sorted(run.scores.items())
    ]
    last = run.scores[max(budgets)]
    line = (
        f"{method.name} {concept_name} seed {seed}: {run.steps_per_s:.1f} steps/s, at {max(budgets)} steps "
        f"reconstruction {last.reconstruction:.2f}, editability {last.editability:.2f}"
    )
    return rows, line


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.own_words:
        judge_own_words(args)
        return 0
    rows = [row for path in args.from_csv for row in read_rows(path)] if args.from_csv else train_and_judge(args)
    write_results(args, rows, started)
    return 0


def judge_own_words(args: argparse.Namespace) -> None:
    """Reconstruction and editability of the concepts' own words (``--own-words``), per concept over the seeds;
    prints a table and writes ``own-words.json``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, judges = load_model(args.model), load_judges()
    concepts = [world.HELD_OUT_CONCEPTS[name] for name in args.concepts if world.HELD_OUT_CONCEPTS[name].own_words]
    results = {}
    print("concept            words            reconstruction   editability")
    for concept in concepts:
        scores = [
            learning.score_own_words(model, judges, concept, images_per_prompt=args.images_per_prompt, seed=seed)
            for seed in args.seeds
        ]
        recon = learning.mean_and_interval([s.reconstruction for s in scores])
        edit = learning.mean_and_interval([s.editability for s in scores])
        results[concept.name] = {
            "words": concept.own_words,
            "seeds": list(args.seeds),
            "reconstruction": recon[0],
            "reconstruction_ci95": recon[1],
            "editability": edit[0],
            "editability_ci95": edit[1],
        }
        line = f"{concept.name:18s} {concept.own_words:16s} {recon[0]:.3f} ±{recon[1]:.3f}"
        print(f"{line}   {edit[0]:.3f} ±{edit[1]:.3f}")
    mean = sum(r["editability"] for r in results.values()) / max(len(results), 1)
    print(f"mean editability over these {len(results)} concepts: {mean:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "own-words.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote own-words.json in {args.out}")


def read_rows(path: Path) -> list[dict[str, Any]]:
    numbers = {"seed": int, "steps": int, "images": int, "vectors_step": int, "steps_trained": int}
    with open(path, newline="", encoding="utf-8") as f:
        return [
            {k: v if k in ("method", "concept", "init_choice") else numbers.get(k, float)(v) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def train_and_judge(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
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
                pool = stack.enter_context(
                    ProcessPoolExecutor(
                        args.jobs,
                        mp_context=multiprocessing.get_context("spawn"),
                        initializer=_start_worker,
                        initargs=(args.model, args.threads),
                    )
                )
                results = pool.map(_run_one, tasks)
            for task_rows, line in results:
                rows.extend(task_rows)
                print(line, flush=True)
    return rows


def write_results(args: argparse.Namespace, rows: list[dict[str, Any]], started: float) -> None:
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
    (args.out / "learning.md").write_text(markdown(summary, rows), encoding="utf-8")
    threads = args.threads or torch.get_num_threads()
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.jobs} job(s) of {threads} thread(s)"
    )
    print(f"\n{machine}, {datetime.date.today()}, {time.perf_counter() - started:.0f} s in all")
    print_table(summary)
    correlations = score_correlations(rows)
    with open(args.out / "score-correlation.json", "w", encoding="utf-8") as f:
        json.dump(correlations, f, indent=2)
    print(
        "\nheld-out score vs judged reconstruction (Spearman; lower loss counted as better), "
        f"over {correlations['rows']} scored (run, budget) rows: raw {correlations.get('raw', float('nan')):.3f}, "
        f"relative to step 0 {correlations.get('relative', float('nan')):.3f}, within a run's budgets "
        f"{correlations.get('within_runs', float('nan')):.3f} (mean over "
        f"{correlations.get('runs_with_varying_reconstruction', 0)} runs whose reconstruction varied)"
    )
    same = correlations.get("same_photos")
    if same and same["mixed_photo_sets"]:
        print(
            f"on the same photos, where some runs found the concept and some did not ({same['mixed_photo_sets']} "
            f"sets): the lowest held-out score picked one that found it in {same['lowest_score_found']}; "
            f"{same['pairs_ordered_right']} of {same['pairs']} (found, not found) pairs ordered right"
        )
    written = "learning.csv, learning-summary.csv, learning.png, learning.md and score-correlation.json"
    print(f"\nwrote {written} in {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
