"""The standalone command line: ``python -m embedding_trainer COMMAND`` (train, jobs, render, inspect, convert, demo,
make-tiny-model, export-a1111).

Training flags are generated from ``TrainConfig``'s fields, so the CLI, the saved run config and (later) the
WebUI and API accept the same names and values.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import TrainConfig, field_kind
from ..errors import ConfigError, EmbeddingTrainerError, LostProcessesError
from ..log import logger
from ..toyworld.world import HELD_OUT_CONCEPTS

if TYPE_CHECKING:  # torch is imported once a command runs, not for --help
    from ..distributed import Processes

#: Options that are not TrainConfig fields (host-specific or CLI-only).
_CLI_ONLY = {"model", "config", "command", "quiet", "job_file", "summary"}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training options (TrainConfig fields)")
    for f in TrainConfig.fields():
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        help_text = meta["help"] + (f" (default: {f.default})" if f.default not in ("", None) else "")
        kind = field_kind(f)
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
            continue
        group.add_argument(
            flag,
            type={"int": int, "float": float}.get(kind, str),
            choices=meta.get("choices"),
            default=argparse.SUPPRESS,
            metavar=f.name.upper() if not meta.get("choices") else None,
            help=help_text,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m embedding_trainer", description="Textual-inversion training.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train an embedding on a diffusers-format model folder (under torchrun: data-parallel, one process "
        "per GPU, each taking its share of every batch)",
    )
    train.add_argument("--model", required=True, help="diffusers model folder (with model_index.json)")
    train.add_argument("--config", help="JSON file of TrainConfig fields (flags given here override it)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(train)

    jobs = sub.add_parser(
        "jobs",
        help="train many embeddings from a job file (JSON Lines, one object of training options per embedding); "
        "under torchrun the jobs spread over the processes",
    )
    jobs.add_argument("job_file", metavar="JOB_FILE", help='e.g. a line {"name": "my-cat", "images": "photos/cat"}')
    jobs.add_argument("--model", default="", help="diffusers model folder for jobs that name no \"model\"")
    jobs.add_argument("--config", help="JSON file of defaults for every job (flags given here override it)")
    jobs.add_argument("--summary", help="where to write the JSON summary (default: JOB_FILE.summary.json)")
    _add_config_flags(jobs)

    render = sub.add_parser(
        "render",
        help="draw images with embeddings on a diffusers model: a grid, a row per prompt, a column per seed",
    )
    render.add_argument("--model", required=True, help="diffusers model folder (with model_index.json)")
    render.add_argument("--embedding", action="append", required=True, metavar="FILE",
                        help="embedding file; its trigger is the name stored in it (repeat for several)")  # fmt: skip
    render.add_argument("--prompt", action="append", required=True, help="a prompt with a trigger (repeat for rows)")
    render.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4], help="one column per seed")
    render.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    render.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance scale (default 7)")
    render.add_argument("--size", type=int, default=None, help="pixels (default: the model's own)")
    render.add_argument("--negative", default="", help="negative prompt")
    render.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    render.add_argument("--out", default="render.png", help="the grid's PNG file (default render.png)")
    render.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    inspect = sub.add_parser("inspect", help="describe an embedding file")
    inspect.add_argument("file")

    convert = sub.add_parser("convert", help="convert an embedding file between layouts (by the output suffix)")
    convert.add_argument("input")
    convert.add_argument("output", help="*.safetensors, *.pt (the WebUI's layout) or *.png (the WebUI's picture card)")
    convert.add_argument("--picture", help="for a .png card: the image it shows (default: a plain tile)")
    convert.add_argument("--overwrite", action="store_true")

    demo = sub.add_parser(
        "demo", help="teach the shipped toy model a shape it has no word for; writes the file, a grid and scores"
    )
    demo.add_argument("--out", default="demo-output", help="folder for the photos, embedding, grid and scores")
    demo.add_argument(
        "--concept",
        default="heart",
        help="the held-out concept to learn",
        choices=sorted(name for name, concept in HELD_OUT_CONCEPTS.items() if not concept.erase),  # the shipped model
    )
    demo.add_argument("--steps", type=int, default=150)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--overwrite", action="store_true", help="start over in an existing demo folder")

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random-weight diffusers model (for trying things)")
    tiny.add_argument("family", choices=("sd1", "sd2", "sdxl"))
    tiny.add_argument("out")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--webui-loadable",
        action="store_true",
        help="32 norm groups and OpenCLIP MLPs 4x wide, so `export-a1111` gives a checkpoint A1111 builds and loads",
    )

    export = sub.add_parser(
        "export-a1111",
        help="write a diffusers SD1, SD2 or SDXL model as a WebUI checkpoint: OUT.safetensors + OUT.yaml, plus "
        "OUT-text-encoder/ (SD1, SDXL) and OUT.open_clip.json (SD2, SDXL, unless the OpenCLIP encoder is ViT-H-14's "
        "or ViT-bigG-14's)",
        description="Write a diffusers SD1, SD2 or SDXL model folder as a checkpoint the AUTOMATIC1111 WebUI loads: "
        "OUT.safetensors (ldm layout for SD1/SD2, sgm for SDXL) and OUT.yaml beside it (v-prediction when the "
        "scheduler says v_prediction); OUT-text-encoder/ holds the CLIP(-L) config and tokenizer the yaml points at. "
        "An OpenCLIP encoder (SD2, SDXL's second) that is not exactly ViT-H-14's / ViT-bigG-14's text tower gets "
        "OUT.open_clip.json: the WebUI must run open_clip.add_model_config(that file) before it loads the model.",
    )
    export.add_argument("model_dir", metavar="MODEL_DIR", help="diffusers model folder (with model_index.json)")
    export.add_argument("out", metavar="OUT", help="output name, e.g. models/Stable-diffusion/tiny[.safetensors]")
    export.add_argument("--overwrite", action="store_true", help="replace existing output files")
    export.add_argument("--half", action="store_true", help="store the weights as float16")
    export.add_argument(
        "--allow-norm-group-mismatch",
        action="store_true",
        help="write a model whose GroupNorms do not use 32 groups (the WebUI would compute a different function)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """``--config`` file (or the resumed run's config), then the flags given explicitly on the command line."""
    return TrainConfig.from_dict(config_values(args))


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields the command line gives (see :func:`config_from_args`), not yet checked together."""
    values: dict[str, Any] = {}
    if getattr(args, "resume", ""):
        from ..run_state import find_state, load_state

        values.update(TrainConfig.saved_fields(load_state(find_state(args.resume))[1]["config"]))
    if args.config:
        config_file = Path(args.config)
        if not config_file.is_file():
            raise ConfigError("config", f"--config {args.config}: no such file; give the path of a JSON file of fields")
        loaded = json.loads(config_file.read_text(encoding="utf-8"))
        if not isinstance(loaded, dict):
            raise ConfigError("config", f"{args.config} must hold a JSON object of fields, got {type(loaded).__name__}")
        values.update(loaded)
    values.update({k: v for k, v in vars(args).items() if k not in _CLI_ONLY})
    return values


class ProgressBar:
    """Progress on stderr: on a terminal one status line redrawn in place (bar, step, loss, rate, ETA); otherwise
    (a log file, a pipe, CI) a plain line every twentieth of the run or every 30 seconds."""

    LINES_PER_RUN = 20
    PLAIN_EVERY_S = 30.0

    def __init__(self, stream: Any = None, width: int = 24, label: str = "", interactive: bool | None = None):
        """``label``: what plain lines start with (e.g. a job's name); ``interactive``: False for plain lines even on
        a terminal (several processes share it)."""
        self.stream, self.width = stream if stream is not None else sys.stderr, width  # stderr as it is now
        self.label = label
        if interactive is None:
            interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interactive = interactive
        self.last = 0.0 if self.interactive else time.monotonic()  # plain lines: the 30 s clock starts now
        self.open_line = False  # a redrawn line without its newline yet

    def __call__(self, p: Any) -> None:
        now = time.monotonic()
        eta = _duration(p.eta_s) if p.eta_s != float("inf") else "?"
        text = (
            f"{p.step}/{p.total_steps} loss {p.loss:.4f} (avg {p.smoothed_loss:.4f}) lr {p.learning_rate:.2e} "
            f"{p.it_per_s:.2f} it/s ETA {eta}"
        )
        done = p.step >= p.total_steps
        if not self.interactive:
            every = max(1, p.total_steps // self.LINES_PER_RUN)
            if done or p.step % every == 0 or now - self.last >= self.PLAIN_EVERY_S:
                self.last = now
                self.stream.write(f"{self.label + ' ' if self.label else ''}step {text}\n")
                self.stream.flush()
            return
        if now - self.last < 0.1 and not done:
            return
        self.last = now
        filled = int(self.width * p.step / p.total_steps)
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {text}  ")
        self.open_line = not done
        if done:
            self.stream.write("\n")
        self.stream.flush()

    def end_line(self) -> None:
        """End a redrawn line, so what is printed next starts on its own line."""
        if self.open_line:
            self.stream.write("\n")
            self.stream.flush()
            self.open_line = False


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def _quiet_libraries() -> None:
    """diffusers/transformers print load bars and advice on every load; keep the terminal for our progress."""
    import warnings

    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except (ImportError, AttributeError):
        pass
    warnings.filterwarnings("ignore", module="diffusers")
    warnings.filterwarnings("ignore", module="transformers")


class StopSignals:
    """Ctrl-C (SIGINT) asks the run to stop after its step and save; a second one aborts. Under torchrun SIGTERM asks
    too (torchrun sends it when another process fails) and a repeat never aborts: torchrun forwards the terminal's
    Ctrl-C, so every process gets it twice, and torchrun itself kills a process that does not stop in time."""

    def __init__(self, processes: Processes):
        self.asked = False
        self.processes = processes
        self.signals = [signal.SIGINT, signal.SIGTERM] if processes.distributed else [signal.SIGINT]
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self.previous = {number: signal.signal(number, self._on_signal) for number in self.signals}
        return self

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.asked:
            if not self.processes.distributed:
                raise KeyboardInterrupt
            return
        self.asked = True
        if self.processes.distributed:
            if self.processes.writes_files:
                logger.warning("stopping: every process stops after the same step and process 0 saves")
        else:
            logger.warning("\nstopping after this step and saving (Ctrl-C again to abort)")


def _resume_command(model: str, run_dir: Path, processes: Processes) -> str:
    launcher = ["python", "-m"]
    if processes.distributed:  # torchrun again (several nodes: with the same node options as before)
        per_node = os.environ.get("LOCAL_WORLD_SIZE", str(processes.world_size))
        one_node = ["--standalone"] if per_node == str(processes.world_size) else []
        launcher = ["torchrun", *one_node, "--nproc-per-node", per_node, "-m"]
    return shlex.join([*launcher, "embedding_trainer", "train", "--model", model, "--resume", str(run_dir)])


def load_host(model: str, device: Any, precision: str, where: str = "") -> Any:
    """The diffusers model folder ``model`` as a host on ``device``, its weights in ``precision``'s dtype."""
    from ..hosts.diffusers_host import DiffusersHost
    from ..trainer import COMPUTE_DTYPES

    logger.info("loading %s on %s (%s)%s", model, device, precision, where)
    return DiffusersHost.from_pretrained(model, device=device, dtype=COMPUTE_DTYPES[precision])


def run_training(
    config: TrainConfig, model: str, show_progress: bool = True, processes: Processes | None = None
) -> tuple[Any, Any]:
    """Load the model as the config asks and train; Ctrl-C stops cleanly (a second Ctrl-C aborts).

    ``processes``: this process's place in a data-parallel run under torchrun (default one process): every process
    loads the model and trains its share of each batch; process 0 writes the files and reports progress.
    Returns the ``Trainer`` and its ``TrainResult``.
    """
    from ..distributed import Processes
    from ..run_state import STATE_SUFFIX
    from ..trainer import (
        Callbacks,
        Trainer,
        check_inputs,
        check_output_free,
        resolve_device,
        resolve_precision,
    )

    processes = processes or Processes()
    config.require_for_training()
    device = resolve_device(processes.device(config.device))
    precision = resolve_precision(config.precision, device)
    processes.join(device)
    stop = StopSignals(processes)
    bar = ProgressBar() if show_progress and processes.writes_files else None

    def on_evaluation(step: int, score: float) -> None:
        if bar is not None:
            bar.end_line()
        logger.info("step %d: held-out loss %.4f (fixed views of the images; lower is better)", step, score)

    callbacks = Callbacks(on_progress=bar, should_stop=lambda: stop.asked, on_evaluation=on_evaluation)
    trainer: Trainer | None = None
    problem: BaseException | None = None
    try:
        check_output_free(config)  # before minutes of model loading
        check_inputs(config)
        where = f" in {processes.world_size} processes (this is {processes.rank})" if processes.distributed else ""
        host = load_host(model, device, precision, where)
        trainer = Trainer(config, host, callbacks, processes)
    except Exception as error:  # noqa: BLE001 - every process must hear of it (agree raises it again)
        problem = error
    processes.agree(problem, "setting up the run")  # a process that failed raises; the others name it
    assert trainer is not None
    processes.check_same(
        json.dumps([[str(r.path), r.size] for r in trainer.scan.records]) + config.to_json(),
        "training images or settings",
    )
    logger.info("%s", trainer.describe())
    with stop:
        try:
            result = trainer.run()
        except LostProcessesError as error:  # nothing in the run itself went wrong: its saves can go on
            saves = sorted((trainer.run_dir / "saves").glob(f"*{STATE_SUFFIX}"))
            if not saves or not processes.writes_files:
                raise
            resume = _resume_command(model, trainer.run_dir, processes)
            raise LostProcessesError(
                f"{error}\nContinue from the last save ({saves[-1].name}) with:\n  {resume}"
            ) from error
        finally:
            if bar is not None:
                bar.end_line()
    verb = "stopped" if result.stopped else "finished"
    threads = f", {result.cpu_threads.describe()}" if result.cpu_threads and device.type == "cpu" else ""
    this_run = result.steps - trainer.start_step  # a resumed run reports its own steps and time
    resumed = f" (resumed at step {trainer.start_step}, now at {result.steps})" if trainer.start_step else ""
    logger.info(
        "%s after %d steps%s in %s at %d px%s, loss %.4f (avg %.4f)\nembedding: %s%s",
        verb,
        this_run,
        resumed,
        _duration(result.elapsed_s),
        result.resolution,
        threads,
        result.final_loss,
        result.smoothed_loss,
        result.embedding_path,
        "".join(f"\n also:     {p}" for p in result.extra_paths),
    )
    if result.chosen_start:
        logger.info(
            "carried on with start %d of %d (held-out losses %s)", result.chosen_start, len(result.start_scores),
            ", ".join(f"{s:.4f}" for s in result.start_scores),
        )  # fmt: skip
    if result.early_stopped:
        logger.info("stopped early: the held-out score had not improved for %d evaluations", config.early_stop_patience)
    if result.held_out_loss is not None:
        which = "the best held-out score" if result.vectors_step != result.steps else "the last step"
        logger.info(
            "the file holds step %d's vectors (%s): held-out loss %.4f", result.vectors_step, which,
            result.held_out_loss,
        )  # fmt: skip
    if trainer.warnings and processes.writes_files:
        logger.warning("%d warning(s):%s", len(trainer.warnings), "".join(f"\n  {w}" for w in trainer.warnings))
    if result.stopped and processes.writes_files:
        command = _resume_command(model, result.run_dir, processes)
        logger.warning("stopped at step %d; continue with:\n  %s", result.steps, command)
    return trainer, result


def _render(args: argparse.Namespace) -> Path:
    import io

    from ..embedding_file import write_atomically
    from ..tools.render import render_grid

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError("out", f"{out} already exists; choose another --out or add --overwrite")
    if out.suffix.lower() != ".png":
        raise ConfigError("out", f"{out} must be a .png file")
    grid = render_grid(args.model, args.embedding, args.prompt, args.seeds, steps=args.steps, guidance=args.guidance,
                       size=args.size, negative=args.negative, device=args.device)  # fmt: skip
    png = io.BytesIO()
    grid.save(png, format="PNG")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, lambda f: f.write(png.getvalue()), overwrite=True)
    return out


#: The exit status of a training run stopped by Ctrl-C (what a shell reports for SIGINT): it saved, but did not finish.
EXIT_STOPPED = 130
#: The exit status of a job file with failed jobs (the others ran; the summary says which failed and why).
EXIT_JOBS_FAILED = 1


def _train(args: argparse.Namespace, processes: Processes) -> int:
    if not processes.writes_files:  # process 0 reports; the others only say what goes wrong
        logger.setLevel(logging.WARNING)
    try:
        _, result = run_training(config_from_args(args), args.model, not args.quiet, processes)
    finally:
        processes.leave()
    return EXIT_STOPPED if result.stopped else 0


def _jobs(args: argparse.Namespace, processes: Processes) -> int:
    from .jobs import run_jobs

    with StopSignals(processes) as stop:
        defaults = config_values(args)
        TrainConfig.from_dict(defaults)  # the flags themselves must be valid before any job runs
        if defaults.get("resume"):
            raise ConfigError("resume", "is not an option for every job; a job file resumes stopped jobs by itself")
        summary = Path(args.summary) if args.summary else None
        results = run_jobs(Path(args.job_file), defaults, args.model, summary, lambda: stop.asked, processes)
    if results is None:  # not process 0: its jobs are in process 0's summary
        return 0
    if any(r.status == "failed" for r in results):
        return EXIT_JOBS_FAILED
    return EXIT_STOPPED if any(r.status in ("stopped", "not started") for r in results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    from ..distributed import Processes

    processes = Processes.from_environment()  # several processes share the terminal: say which one speaks
    prefix = f"[process {processes.rank}] " if processes.distributed else ""
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    logger.addHandler(handler)
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    _quiet_libraries()
    try:
        if args.command == "train":
            return _train(args, processes)
        if args.command == "jobs":
            return _jobs(args, processes)
        elif args.command == "render":
            print(_render(args))
        elif args.command == "inspect":
            from ..embedding_file import format_inspection, inspect_embedding

            print(format_inspection(inspect_embedding(args.file)))
        elif args.command == "convert":
            from ..embedding_file import convert_embedding

            print(convert_embedding(args.input, args.output, overwrite=args.overwrite, picture=args.picture))
        elif args.command == "demo":
            from ..toyworld.demo import run_demo

            run_demo(Path(args.out), concept=args.concept, steps=args.steps, seed=args.seed, overwrite=args.overwrite)
        elif args.command == "make-tiny-model":
            from ..tools.tiny_models import save_tiny_model

            print(save_tiny_model(args.family, args.out, seed=args.seed, webui_loadable=args.webui_loadable))
        elif args.command == "export-a1111":
            import torch

            from ..tools.export_a1111 import export_a1111

            result = export_a1111(
                args.model_dir,
                args.out,
                overwrite=args.overwrite,
                allow_norm_group_mismatch=args.allow_norm_group_mismatch,
                dtype=torch.float16 if args.half else None,
            )
            print(result.checkpoint)
    except EmbeddingTrainerError as error:
        logger.error("error: %s", error)
        return 2
    except (OSError, json.JSONDecodeError) as error:
        logger.error("error: %s", error)
        return 2
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
    return 0
