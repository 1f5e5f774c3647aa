"""Data-parallel speed-up: one process against N torchrun processes training the same global batch, side by side.

Both sides run the real command line (``python -m embedding_trainer train`` and ``torchrun --standalone
--nproc-per-node N -m embedding_trainer train``) on the same model, images, global batch and steps, alternating
``--repeats`` times so background load hits both alike. Speed is the training loop's own (from the run's
``loss.csv``: the time from the end of the first step to the last, so start-up, model loading and caching are not
counted; the whole command's wall time is printed beside it). On the CPU the cores are shared fairly: one process
uses all ``--cores`` threads, each of N processes ``cores / N``. On GPUs (``--device cuda``) one process uses one GPU
and N processes N GPUs. Examples::

    python -m benchmarks.distributed                              # the shipped toy model, 2 processes, CPU
    python -m benchmarks.distributed --model /models/sd15 --device cuda --processes 4 --batch 8 --resolution 512
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOY_MODEL = ROOT / "embedding_trainer/toyworld/weights/base-model"


def make_images(folder: Path, count: int, size: int) -> Path:
    """``count`` PNGs of a coloured shape on a flat background (what the run trains on does not matter here)."""
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (size, size), tuple(rng.randint(0, 255) for _ in range(3)))
        side = size // 2
        x, y = rng.randint(0, size - side), rng.randint(0, size - side)
        ImageDraw.Draw(image).ellipse((x, y, x + side, y + side), fill=tuple(rng.randint(0, 255) for _ in range(3)))
        image.save(folder / f"{i:02d}.png")
    return folder


def timed_run(args: argparse.Namespace, processes: int, images: Path, work: Path) -> dict[str, float]:
    """One training run; returns the loop's seconds per step and the command's wall time."""
    launcher = [sys.executable, "-m"]
    if processes > 1:
        launcher += ["torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m"]
    command = [
        *launcher,
        "embedding_trainer",
        "train",
        "--model",
        str(args.model),
        "--images",
        str(images),
        "--name",
        "bench",
        "--max-steps",
        str(args.steps),
        "--batch-size",
        str(args.batch),
        "--resolution",
        str(args.resolution),
        "--device",
        args.device,
        "--eval-every",
        "0",
        "--quiet",
        "--output-dir",
        str(work / "out"),
        "--run-dir",
        str(work / "run"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.device == "cpu":  # the same cores for both sides
        env["OMP_NUM_THREADS"] = str(max(1, args.cores // processes))
    started = time.perf_counter()
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({finished.returncode}):\n{finished.stdout}{finished.stderr}")
    with open(work / "run/loss.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    elapsed = [float(row["elapsed_s"]) for row in rows]
    per_step = (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1)
    return {"s_per_step": per_step, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=TOY_MODEL, help="diffusers model folder (default: the toy model)")
    parser.add_argument("--images", type=Path, help="image folder (default: 16 generated images)")
    parser.add_argument("--processes", type=int, default=2, help="torchrun processes (GPUs with --device cuda)")
    parser.add_argument("--batch", type=int, default=8, help="global batch: split over the processes")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3, help="alternations of one and N processes")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="CPU threads in all (CPU runs)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="embtrain-dist-bench-") as tmp:
        images = args.images or make_images(Path(tmp) / "images", 16, args.resolution)
        times: dict[int, list[dict[str, float]]] = {1: [], args.processes: []}
        for repeat in range(args.repeats):
            for processes in (1, args.processes):
                work = Path(tmp) / f"run-{processes}-{repeat}"
                times[processes].append(timed_run(args, processes, images, work))
                print(f"repeat {repeat + 1}, {processes} process(es): {times[processes][-1]}", file=sys.stderr)

    one = statistics.median(t["s_per_step"] for t in times[1])
    many = statistics.median(t["s_per_step"] for t in times[args.processes])
    wall_one = statistics.median(t["wall_s"] for t in times[1])
    wall_many = statistics.median(t["wall_s"] for t in times[args.processes])
    where = f"{args.cores} CPU threads in all" if args.device == "cpu" else "one GPU per process"
    print(
        f"model {args.model.name}, global batch {args.batch} at {args.resolution} px, {args.steps} steps, "
        f"{args.device} ({where}), median of {args.repeats}"
    )
    print(f"{'processes':>9}  {'s/step':>8}  {'images/s':>8}  {'command s':>9}")
    for count, per_step, wall in ((1, one, wall_one), (args.processes, many, wall_many)):
        print(f"{count:>9}  {per_step:8.4f}  {args.batch / per_step:8.1f}  {wall:9.1f}")
    print(
        f"speed-up of the training loop with {args.processes} processes: {one / many:.2f}x "
        f"(whole command: {wall_one / wall_many:.2f}x)"
    )
    if args.json:
        record = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "machine": platform.platform(),
            "cpu_count": os.cpu_count(),
            "runs": {str(k): v for k, v in times.items()},
            "speedup_loop": one / many,
            "speedup_command": wall_one / wall_many,
        }
        args.json.write_text(json.dumps(record, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
