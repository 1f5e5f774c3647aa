"""The standalone command line: ``python -m embedding_trainer COMMAND`` (train, jobs, render, inspect, convert, demo,
make-tiny-model, export-a1111).

Training flags are generated from ``TrainConfig``'s fields, so the CLI, the saved run config, the WebUI tab and the
HTTP API accept the same names and values. The run itself is driven by ``driver.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import TrainConfig, field_kind
from ..errors import ConfigError, EmbeddingTrainerError
from ..log import logger
from ..toyworld.world import HELD_OUT_CONCEPTS
from .driver import StopSignals, run_training

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
    jobs.add_argument("--model", default="", help='diffusers model folder for jobs that name no "model"')
    jobs.add_argument("--config", help="JSON file of defaults for every job (flags given here override it)")
    jobs.add_argument("--summary", help="where to write the JSON summary (default: JOB_FILE.summary.json)")
    _add_config_flags(jobs)

    render = sub.add_parser(
        "render",
        help="draw images with embeddings on a diffusers model: a grid, a row per prompt, a column per seed",
    )
    render.add_argument("--model", required=True, help="diffusers model folder (with model_index.json)")
    render.add_argument(
        "--embedding",
        action="append",
        required=True,
        metavar="FILE",
        help="embedding file; its trigger is the name stored in it (repeat for several)",
    )
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


def _render(args: argparse.Namespace) -> Path:
    import io

    from ..atomic_write import write_atomically
    from ..tools.render import render_grid

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError("out", f"{out} already exists; choose another --out or add --overwrite")
    if out.suffix.lower() != ".png":
        raise ConfigError("out", f"{out} must be a .png file")
    grid = render_grid(
        args.model,
        args.embedding,
        args.prompt,
        args.seeds,
        steps=args.steps,
        guidance=args.guidance,
        size=args.size,
        negative=args.negative,
        device=args.device,
    )
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
    from .job_files import run_jobs  # imports torch: not for --help

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
            from ..embedding_inspection import format_inspection, inspect_embedding

            print(format_inspection(inspect_embedding(args.file)))
        elif args.command == "convert":
            from ..embedding_inspection import convert_embedding

            print(convert_embedding(args.input, args.output, overwrite=args.overwrite, picture=args.picture))
        elif args.command == "demo":
            from .demo import run_demo  # draws with the toy model: loaded only for this command

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
