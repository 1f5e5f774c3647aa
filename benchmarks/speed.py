"""Training-step speed and peak memory of the embedding trainer, against the bare UNet lower bound.

For every (arch, resolution, batch, precision, gradient checkpointing) combination this measures, in one process
and alternating so background load hits both alike:

* ours: the real ``Trainer(prepare_run(config), host).run()`` on a generated image folder, per-step wall times taken
  from the progress callback (what a user gets: prompt building, tokenising, both text encoders forward and backward,
  the UNet, the loss, AdamW, the per-step checks and the loss log);
* bare: the UNet forward with the same shapes and dtype plus the backward to ``encoder_hidden_states`` only (UNet
  frozen, no text encoder, no data) -- the least any textual-inversion step can cost.

It prints median seconds per step, steps/s, images/s, peak memory and ours/bare. Examples::

    python -m benchmarks.speed --quick
    python -m benchmarks.speed --arch tiny --resolution 64 --batch 1 4 --precision fp32 --checkpointing both
    python -m benchmarks.speed --arch sd15 --resolution 512 --batch 1 4 --precision fp16 bf16 --checkpointing both
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import datetime
import gc
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks import archs  # noqa: E402
from embedding_trainer.config import TrainConfig  # noqa: E402
from embedding_trainer.hosts.diffusers_host import DiffusersHost  # noqa: E402
from embedding_trainer.trainer import (  # noqa: E402
    COMPUTE_DTYPES,
    Callbacks,
    Trainer,
    prepare_run,
    resolve_device,
    resolve_precision,
)


# -- memory ------------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak CUDA allocation on a GPU; the process's peak resident set (VmHWM) elsewhere. ``reset`` before each."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        try:
            self._libc: Any = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None

    @property
    def label(self) -> str:
        return "peak CUDA allocated" if self.cuda else "peak process RSS (VmHWM)"

    def reset(self) -> float:
        """Start a new peak; returns the memory in use now (MiB), the base the peak rises from."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device) / 2**20
        if self._libc is not None:
            self._libc.malloc_trim(0)  # hand freed heap back, so the last measurement's peak does not linger
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return self._status("VmRSS:")

    def peak_mib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return self._status("VmHWM:")

    @staticmethod
    def _status(field: str) -> float:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- data --------------------------------------------------------------------------------------------------
def write_images(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """``count`` square PNGs (a coloured block on a flat background) with one-line captions."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        x, y = rng.randrange(size // 2), rng.randrange(size // 2)
        ImageDraw.Draw(image).rectangle((x, y, x + size // 2, y + size // 2), fill=(230, 120, 30))
        image.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"block {i}, plain background", encoding="utf-8")
    return folder


# -- the two measurements ------------------------------------------------------------------------------------
class OurStep:
    """The real trainer on one configuration; each ``measure`` is one ``run()`` of warm-up + timed steps."""

    def __init__(self, host: DiffusersHost, config: TrainConfig, warmup: int):
        self.warmup = warmup
        self.marks: list[float] = []
        # on_step comes right after every step (on_progress comes in bursts, at the loop's reports).
        callbacks = Callbacks(on_status=self._on_status, on_step=lambda *_: self.marks.append(time.perf_counter()))
        self.trainer = Trainer(prepare_run(config), host, callbacks)
        self.device = host.device
        self.trainer.objective.fill_cache()  # encode the latents now, so no measurement includes the one-off VAE pass

    def _on_status(self, text: str) -> None:
        if text == "training":  # the step loop starts right after this
            self.marks.append(time.perf_counter())

    def measure(self) -> list[float]:
        self.marks = []
        self.trainer.run()  # overwrite=True: the same trainer runs again from step 0, reusing its latent cache
        if self.device.type == "cuda":
            # The loop does not wait for the GPU between reports, so single steps show launch times; the run's end
            # has waited for everything, so the mean over the timed steps is the real step time.
            end = time.perf_counter()
            timed = len(self.marks) - 1 - self.warmup
            return [(end - self.marks[self.warmup]) / timed] if timed > 0 else []
        times = [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return times[self.warmup :]


class BareStep:
    """UNet forward + backward to ``encoder_hidden_states`` with the shapes and dtype of ``OurStep``."""

    def __init__(self, host: DiffusersHost, batch: int, resolution: int, precision: str, seed: int = 0):
        unet, device = host.unet, host.device
        self.unet, self.device = unet, device
        dtype = next(unet.parameters()).dtype
        generator = torch.Generator().manual_seed(seed)
        size = resolution // 2 ** (len(host.vae.config.block_out_channels) - 1)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=generator)

        self.latents = randn(batch, unet.config.in_channels, size, size).to(device, dtype)
        self.timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(device)
        self.hidden = randn(batch, 77, unet.config.cross_attention_dim).to(device, dtype)
        self.target = randn(batch, unet.config.out_channels, size, size).to(device)
        self.added = None
        if unet.config.addition_embed_type == "text_time":
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch)
            self.added = {"text_embeds": randn(batch, pooled).to(device, dtype), "time_ids": time_ids.to(device, dtype)}
        self.autocast: Any = contextlib.nullcontext()
        if precision != "fp32":  # the trainer's autocast, around the same weights
            self.autocast = torch.autocast(device.type, dtype=COMPUTE_DTYPES[precision])

    def step(self, memory_format: torch.memory_format = torch.contiguous_format) -> None:
        hidden = self.hidden.detach().requires_grad_(True)
        latents = self.latents.contiguous(memory_format=memory_format)
        with self.autocast:
            out = self.unet(latents, self.timesteps, encoder_hidden_states=hidden, added_cond_kwargs=self.added)
        loss = torch.nn.functional.mse_loss(out.sample.float(), self.target)
        loss.backward()
        synchronize(self.device)

    def measure(self, host: DiffusersHost, checkpointing: bool, warmup: int, steps: int) -> list[float]:
        times = []
        # Frozen, eval mode, the same checkpointing and (on the CPU) the same channels-last layout as ours.
        with host.training_session(checkpointing):
            for _ in range(warmup + steps):
                start = time.perf_counter()
                self.step(host.input_memory_format)
                times.append(time.perf_counter() - start)
        return times[warmup:]


@dataclass
class Row:
    arch: str
    resolution: int
    batch: int
    precision: str
    checkpointing: bool
    ours_s: float
    bare_s: float
    ours_peak_mib: float
    bare_peak_mib: float
    ours_rise_mib: float  # peak minus what was in use when the measurement started (weights, cache, ...)
    bare_rise_mib: float
    ours_min_s: float
    bare_min_s: float
    samples: int  # timed steps per side, all repeats together

    @property
    def ratio(self) -> float:
        return self.ours_s / self.bare_s

    def as_csv(self) -> dict[str, Any]:
        row = asdict(self)
        row.update(
            ratio=round(self.ratio, 4),
            ours_steps_per_s=round(1 / self.ours_s, 4),
            ours_images_per_s=round(self.batch / self.ours_s, 4),
            bare_steps_per_s=round(1 / self.bare_s, 4),
            bare_images_per_s=round(self.batch / self.bare_s, 4),
        )
        return row


def measure(
    host: DiffusersHost,
    arch: str,
    images: Path,
    work: Path,
    resolution: int,
    batch: int,
    precision: str,
    checkpointing: bool,
    args: argparse.Namespace,
    memory: PeakMemory,
) -> Row:
    run_name = f"{arch}-{resolution}-{batch}-{precision}-{'ckpt' if checkpointing else 'plain'}"
    config = TrainConfig(
        name="benchtoken",
        images=str(images),
        resolution=resolution,
        batch_size=batch,
        max_steps=args.warmup + args.steps,
        output_dir=str(work / "out" / run_name),
        run_dir=str(work / "runs" / run_name),
        overwrite=True,
        device=str(host.device),
        precision=precision,
        gradient_checkpointing=checkpointing,
        seed=0,
    )
    ours = OurStep(host, config, args.warmup)
    bare = BareStep(host, batch, resolution, precision)
    ours_times: list[float] = []
    bare_times: list[float] = []
    ours_peak = bare_peak = ours_rise = bare_rise = 0.0
    for _ in range(args.repeats):  # alternate, so a burst of background load lands on both sides alike
        base = memory.reset()
        ours_times += ours.measure()
        ours_peak = max(ours_peak, memory.peak_mib())
        ours_rise = max(ours_rise, memory.peak_mib() - base)
        base = memory.reset()
        bare_times += bare.measure(host, checkpointing, args.warmup, args.steps)
        bare_peak = max(bare_peak, memory.peak_mib())
        bare_rise = max(bare_rise, memory.peak_mib() - base)
    del ours, bare
    return Row(
        arch,
        resolution,
        batch,
        precision,
        checkpointing,
        ours_s=statistics.median(ours_times),
        bare_s=statistics.median(bare_times),
        ours_peak_mib=ours_peak,
        bare_peak_mib=bare_peak,
        ours_rise_mib=ours_rise,
        bare_rise_mib=bare_rise,
        ours_min_s=min(ours_times),
        bare_min_s=min(bare_times),
        samples=len(ours_times),
    )


# -- output ---------------------------------------------------------------------------------------------------
COLUMNS = (
    ("arch", 7),
    ("res", 5),
    ("batch", 5),
    ("prec", 5),
    ("ckpt", 4),
    ("ours s/step", 11),
    ("steps/s", 8),
    ("img/s", 8),
    ("peak MiB", 9),
    ("bare s/step", 11),
    ("steps/s", 8),
    ("img/s", 8),
    ("peak MiB", 9),
    ("ratio", 6),
)


def table_header() -> str:
    head = " | ".join(f"{name:>{width}}" for name, width in COLUMNS)
    return head + "\n" + "-+-".join("-" * width for _, width in COLUMNS)


def table_line(row: Row) -> str:
    cells = (
        row.arch,
        row.resolution,
        row.batch,
        row.precision,
        "on" if row.checkpointing else "off",
        f"{row.ours_s:.4f}",
        f"{1 / row.ours_s:.2f}",
        f"{row.batch / row.ours_s:.2f}",
        f"{row.ours_peak_mib:.0f}",
        f"{row.bare_s:.4f}",
        f"{1 / row.bare_s:.2f}",
        f"{row.batch / row.bare_s:.2f}",
        f"{row.bare_peak_mib:.0f}",
        f"{row.ratio:.2f}",
    )
    return " | ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, COLUMNS, strict=True))


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    return (
        f"{name}; {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; torch {torch.__version__}; "
        f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}"
    )


# -- main ---------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch",
        nargs="+",
        default=["tiny"],
        choices=archs.ARCHS,
        help="tiny/tiny-xl: the test models; sd15/sdxl: full-size shapes with random weights",
    )
    parser.add_argument("--resolution", nargs="+", type=int, help="pixels (default: tiny 64, sd15 512, sdxl 1024)")
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=("fp32", "fp16", "bf16"),
        help="default: bf16 (or fp16) on CUDA, fp32 elsewhere; fp16 runs on CUDA only",
    )
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default="off")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat and side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each repeat")
    parser.add_argument("--repeats", type=int, default=3, help="alternations of ours and bare")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--csv", type=Path, help="also write the rows to this CSV file")
    parser.add_argument(
        "--force-cpu-sdxl",
        action="store_true",
        help="run sdxl even without CUDA (about 14 GB of fp32 weights and minutes per step)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short form: tiny, 64 px, batch 1 and 4, fp32, no checkpointing, 4 steps x 3 repeats",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.arch, args.resolution, args.batch, args.precision = ["tiny"], [64], [1, 4], ["fp32"]
        args.checkpointing, args.steps, args.warmup, args.repeats = "off", 4, 1, 3
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--steps and --repeats must be at least 1, --warmup at least 0")
    return args


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    with contextlib.suppress(ImportError):
        import diffusers.utils.logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    with contextlib.suppress(ImportError):
        import transformers.utils.logging as transformers_logging

        transformers_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precisions = []
    for p in args.precision or [resolve_precision("auto", device)]:
        if p == "fp16" and device.type != "cuda":
            print(f"skipping fp16: it needs CUDA (its grad scaler is CUDA-only), and this run is on {device.type}")
            continue
        precisions.append(p)
    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    memory = PeakMemory(device)
    print(f"machine: {machine(device)}")
    print(
        f"timing: median of {args.steps} steps x {args.repeats} repeats per side after {args.warmup} warm-up "
        f"step(s) each; ours = Trainer.run() step, bare = UNet fwd + bwd to its text input; memory: {memory.label}"
    )
    rows: list[Row] = []
    header_printed = False
    with tempfile.TemporaryDirectory(prefix="embtrain-bench-") as tmp:
        work = Path(tmp)
        for arch in args.arch:
            if arch == "sdxl" and device.type != "cuda" and not args.force_cpu_sdxl:
                print(
                    "skipping sdxl: no CUDA device (on a CPU it needs ~14 GB of fp32 weights and minutes per "
                    "step; pass --force-cpu-sdxl to run it anyway)"
                )
                continue
            if not precisions:
                break
            started = time.perf_counter()
            components = archs.build(arch, device, COMPUTE_DTYPES[precisions[0]])
            host = DiffusersHost.from_components(components, device, model_name=arch)
            print(
                f"built {arch} in {time.perf_counter() - started:.1f} s: UNet "
                f"{archs.parameter_count(host.unet) / 1e6:.0f}M parameters, text encoder(s) "
                f"{' + '.join(f'{archs.parameter_count(e) / 1e6:.0f}M' for e in host.text_encoders)}"
            )
            for precision in precisions:
                dtype = COMPUTE_DTYPES[precision]
                for model in (host.unet, *host.text_encoders):
                    model.to(dtype)  # as DiffusersHost.from_pretrained loads them; the VAE stays fp32
                for resolution in args.resolution or [archs.RESOLUTION[arch]]:
                    images = work / f"images-{resolution}"
                    if not images.exists():
                        write_images(images, max(4, *args.batch), resolution)
                    for batch in args.batch:
                        for ckpt in checkpointing:
                            row = measure(host, arch, images, work, resolution, batch, precision, ckpt, args, memory)
                            if not header_printed:
                                print(table_header())
                                header_printed = True
                            print(table_line(row), flush=True)
                            rows.append(row)
            del host, components
            gc.collect()
    if args.csv and rows:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0].as_csv()))
            writer.writeheader()
            writer.writerows(r.as_csv() for r in rows)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
