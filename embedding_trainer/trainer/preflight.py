"""Before a run: the config checked for training, the output rules, the inputs read once (the images decoded once,
for the run itself too), where it computes (device and precision), and, once its model is there, what the model
decides: the resolution, the timesteps and whether a resumed run can go on with these settings.

``prepare_run`` is the one way into a run for every front end; ``Trainer(prepared, host)`` then starts it without
reading the inputs again.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import TrainConfig
from ..dataset import ScanResult, scan_dataset
from ..distributed import Processes
from ..embedding_reading import load_embedding
from ..errors import ConfigError, EmbeddingFileError
from ..host import Host
from ..log import logger
from ..run_state import find_state, load_state, run_folder_of
from ..schedules import LearningRate, parse_learning_rate
from ..templates import AUTO_TEMPLATE, PromptBuilder, load_template, template_for

#: Fields that may differ between a run and its resumption without changing what is trained.
RESUMABLE_CHANGES = frozenset(
    {
        "max_steps",
        "save_every",
        "keep_saves",
        "resume",
        "device",
        "overwrite",
        "output_dir",
        "write_pt",
        "write_card",
        "card_picture",
        "eval_every",
        "early_stop_patience",
        "final_vectors",
        "gradient_checkpointing",
        "run_dir",  # a resume works in the folder it was given (a run folder can be moved or copied)
    }
)

COMPUTE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: Pixels of decoded images a prepared run keeps for its training set, so that each image is decoded once per run
#: (3-20 photos of 12 megapixels fit). An image past it is decoded again when the run first draws it.
KEEP_DECODED_BYTES = 2**30


def output_path(config: TrainConfig) -> Path:
    return Path(config.output_dir) / f"{config.name}.safetensors"


def check_output_free(config: TrainConfig) -> None:
    """Refuse to start a run whose result would replace an existing file the user did not offer (cheap: call it
    before loading a model)."""
    path = output_path(config)
    if path.exists() and not (config.overwrite or config.resume):
        raise EmbeddingFileError(
            f"{path} already exists; choose another name or output_dir, or set overwrite (--overwrite) to replace it"
        )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError("device", f"{device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{device!r} was asked for but torch sees no CUDA GPU; use cpu or auto")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` picks bf16 (or fp16 on GPUs without bf16) on CUDA and fp32 elsewhere."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda" and not fp16_supported_on(device.type):
        raise ConfigError(
            "precision",
            f"fp16 needs a CUDA GPU, or torch 2.3 or newer for fp16 autocast and a grad scaler on the {device.type} "
            f"(this is torch {torch.__version__}); use fp32 or bf16",
        )
    return precision


@functools.cache
def fp16_supported_on(device_type: str) -> bool:
    """Whether this torch has fp16 autocast and a grad scaler for ``device_type`` (CPU: torch >= 2.3)."""
    if not (hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler")):
        return False
    try:
        torch.amp.GradScaler(device_type)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # older versions warn and disable autocast for unsupported dtypes
            with torch.autocast(device_type, dtype=torch.float16):
                product = torch.ones(2, 2, device=device_type) @ torch.ones(2, 2, device=device_type)
    except (RuntimeError, ValueError, AssertionError):
        return False
    return product.dtype == torch.float16


@dataclass(frozen=True)
class Placement:
    """Where a run computes: the device and the precision of autocast (the vectors always stay fp32)."""

    device: torch.device
    precision: str

    @property
    def dtype(self) -> torch.dtype:
        """The dtype to load a model's weights in for this precision."""
        return COMPUTE_DTYPES[self.precision]

    @classmethod
    def on_host(cls, precision: str, host: Host) -> Placement:
        """On a loaded model: its device; a host whose weights have a precision (the WebUI's fp16 model) decides
        what ``auto`` means."""
        preferred = getattr(host, "preferred_precision", None)
        wanted = preferred if precision == "auto" and preferred else precision
        return cls(host.device, resolve_precision(wanted, host.device))


@dataclass(frozen=True)
class PreparedRun:
    """A run checked and read before its model is needed; ``Trainer(prepared, host)`` starts it."""

    config: TrainConfig  # checked for training
    processes: Processes  # this process's place in a data-parallel run
    placement: Placement | None  # where to load the model; None: on the host the run is given
    scan: ScanResult  # the usable images (their pixels kept for the run) and the skipped files
    prompts: PromptBuilder
    lr_schedule: LearningRate

    def recheck(self) -> PreparedRun:
        """Before a run prepared a while ago starts (the WebUI checks a run when it is queued): the output must still
        be free and the files to start from still there. The images are listed and stat'ed, not decoded; if any
        image or caption changed, the inputs are read again."""
        check_output_free(self.config)
        _check_start_files(self.config)
        if self.scan.unchanged():
            return self
        prompts, scan = _read_inputs(self.config, KEEP_DECODED_BYTES)
        return dataclasses.replace(self, prompts=prompts, scan=scan)


def prepare_run(config: TrainConfig, processes: Processes | None = None, *, device: str | None = None) -> PreparedRun:
    """Check ``config`` for a run and read its inputs, once: the template and the image folder (every image decoded
    here, and kept for the run), the files to start from, and that the result would not replace a file unasked.

    ``device``: where the caller is going to load the model (as ``TrainConfig.device``; under torchrun ``auto`` and
    ``cuda`` mean this process's GPU); the device and precision are resolved here (``prepared.placement``), and a
    data-parallel run joins its process group there. Without it the run computes on the host ``Trainer`` is given.
    Raises ``ConfigError``, ``DatasetError`` or ``EmbeddingFileError`` naming what to change; in a data-parallel run
    every process raises when any of them failed.
    """
    processes = processes or Processes()
    config.require_for_training()
    placement = None
    if device is not None:
        resolved = resolve_device(processes.device(device))
        placement = Placement(resolved, resolve_precision(config.precision, resolved))
        processes.join(resolved)
    elif processes.distributed:
        raise ValueError("a data-parallel run is prepared with the device it trains on (prepare_run(device=...))")
    problem: Exception | None = None
    logger.info("checking the prompt template and scanning %s", config.images)
    try:
        check_output_free(config)  # before minutes of model loading
        lr_schedule = parse_learning_rate(config.learning_rate)
        prompts, scan = _read_inputs(config, KEEP_DECODED_BYTES)
    except Exception as error:  # noqa: BLE001 - every process must hear of it (agree raises it again)
        problem = error
    processes.agree(problem, "setting up the run")  # a process that failed raises; the others name it
    processes.check_same(
        json.dumps([[str(r.path), r.size] for r in scan.records]) + config.to_json(), "training images or settings"
    )
    return PreparedRun(config, processes, placement, scan, prompts, lr_schedule)


def _read_inputs(config: TrainConfig, keep_bytes: int) -> tuple[PromptBuilder, ScanResult]:
    scan = scan_dataset(config.images, recursive=config.recursive, min_images=config.min_images, keep_bytes=keep_bytes)
    template = template_for(config.template, scan.captioned, len(scan.records))
    prompts = PromptBuilder(
        load_template(template), config.name, config.shuffle_tags, config.tag_dropout, template=template
    )
    _check_start_files(config)
    return prompts, scan


def _check_start_files(config: TrainConfig) -> None:
    if config.init_mode == "file" and not Path(config.init_file).is_file():
        raise ConfigError("init_file", f"'{config.init_file}' does not exist; give the path of an embedding file")
    if config.resume:
        find_state(config.resume)


# -- once the model is there ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResumePoint:
    """The saved state a run resumes from."""

    path: Path
    tensors: dict[str, torch.Tensor]  # vectors, AdamW moments, grad-scaler state
    step: int  # the run steps it had done
    base_step: int  # the steps its init file had


@dataclass(frozen=True)
class RunPlan:
    """A prepared run on its model: what the model decides, resolved once."""

    config: TrainConfig  # the resolution filled in; a resume's run_dir the folder it resumes in
    native_resolution: bool  # the config said 0: the checkpoint's own
    placement: Placement
    resume: ResumePoint | None
    output_path: Path
    replaces_output: bool  # overwrite asked for, or a resume replacing the embedding its own stopped run wrote

    @property
    def run_dir(self) -> Path:
        return Path(self.config.effective_run_dir)

    @property
    def start_step(self) -> int:
        return self.resume.step if self.resume else 0


def plan_on_model(prepared: PreparedRun, host: Host) -> RunPlan:
    """Resolve ``prepared`` against the model: its resolution (0: the checkpoint's own), where it computes, and the
    resumed run (the settings it may not change, the steps it has done)."""
    config = prepared.config
    native = not config.resolution
    # Resolution 0 means the checkpoint's own size; the config (its config.json, status and saves) says which.
    config = config.replace(resolution=config.resolution or host.default_resolution)
    placement = prepared.placement or Placement.on_host(config.precision, host)
    if placement.device.type != host.device.type:
        raise ConfigError("device", f"the model is on {host.device}, but the run was prepared for {placement.device}")
    resume = _resume_point(config, host.default_resolution) if config.resume else None
    if resume is not None:  # work in the folder given, wherever the run was first (config.json, loss.csv, saves)
        config = config.replace(run_dir=str(run_folder_of(resume.path)))
    path = output_path(config)
    replaces = config.overwrite or (resume is not None and _is_the_resumed_runs(path, config.name, resume))
    return RunPlan(config, native, placement, resume, path, replaces)


def _resume_point(config: TrainConfig, default_resolution: int) -> ResumePoint:
    state_path = find_state(config.resume)
    tensors, meta = load_state(state_path)
    saved = TrainConfig.from_dict(TrainConfig.saved_fields(meta["config"]))
    saved = saved.replace(resolution=saved.resolution or default_resolution)  # older saves: 0
    for f in TrainConfig.fields():
        if f.name not in RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(config, f.name):
            raise ConfigError(
                f.name,
                f"{getattr(config, f.name)!r} differs from the run being resumed ({getattr(saved, f.name)!r} "
                f"in {state_path}); keep it, or start a new run without resume",
            )
    step = int(meta["step"])
    if step >= config.max_steps:
        raise ConfigError(
            "max_steps", f"the run in {state_path} already did {step} steps; raise max_steps to train more"
        )
    return ResumePoint(state_path, tensors, step, int(meta["base_step"]))


def _is_the_resumed_runs(path: Path, name: str, resume: ResumePoint) -> bool:
    if not path.exists():
        return True
    try:
        existing = load_embedding(path)
    except EmbeddingFileError:
        return False
    if existing.name != name:
        return False
    # The file holds the last vectors, or the best ones of a run that had done the resumed steps.
    run_steps = existing.metadata.get("run_steps")
    return existing.step == resume.base_step + resume.step or run_steps == str(resume.step)


def check_outputs(plan: RunPlan) -> None:
    """The output rules (after a killed run's temporary files are gone): no file replaced unasked, and a run folder
    that holds a previous run is resumed or, with overwrite, started over (its saves removed)."""
    config, run_dir = plan.config, plan.run_dir
    check_output_free(config)
    if plan.resume is not None and not plan.replaces_output:
        raise EmbeddingFileError(
            f"{plan.output_path} already exists and is not the embedding the resumed run wrote when it stopped "
            f"(step {plan.resume.base_step + plan.resume.step}); set overwrite (--overwrite) to replace it, or "
            "choose another output_dir"
        )
    saves = run_dir / "saves"
    if not config.resume and saves.is_dir() and any(saves.iterdir()):
        if not config.overwrite:
            raise ConfigError(
                "run_dir",
                f"{run_dir} holds a previous run; resume it (resume={run_dir}), choose another run_dir, or set "
                "overwrite (--overwrite) to start over",
            )
        shutil.rmtree(saves)


def run_warnings(prepared: PreparedRun, host: Host) -> list[str]:
    """What is questionable about this run before it starts: skipped files, a trigger the model knows, ..."""
    config, scan, prompts = prepared.config, prepared.scan, prepared.prompts
    found = [f"skipped {problem.path}: {problem.message}" for problem in scan.problems]
    processes, batch = prepared.processes.world_size, config.batch_size
    if processes > batch:
        found.append(
            f"batch_size {batch} over {processes} processes leaves {processes - batch} of them without images in "
            f"every batch; raise batch_size to at least {processes} or start fewer processes"
        )
    captioned, images = scan.captioned, len(scan.records)
    if captioned and not prompts.uses_filewords:
        if config.template.strip() == AUTO_TEMPLATE:
            unused = (
                f"{captioned} of the {images} images have caption files; template auto uses captions only when "
                f"every image has one (else file names would stand in), so they are not used: add caption files "
                f"for the other {images - captioned}, or choose subject_filewords"
            )
        else:
            unused = (
                f"{captioned} of the {images} images have caption files, but template '{config.template}' "
                "has no [filewords], so they are not used; a _filewords template (subject_filewords, "
                "style_filewords) puts them in the prompts, as auto does when every image has one"
            )
        found.append(
            f"{unused}. In the captions, name what is NOT the concept (colour, background, pose, ...): the embedding "
            "then leaves those out, and prompts can change them"
        )
    if host.known_token_count(config.name) == 1:
        found.append(
            f"'{config.name}' is a word the model already knows; prompts that mean that word will now mean the "
            f"embedding (a made-up name such as 'my-{config.name}' avoids this)"
        )
    return found
