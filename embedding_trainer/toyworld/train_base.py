"""Train the toy world's base model from scratch: ``python -m embedding_trainer.toyworld.train_base --out DIR``.

Stages (``--stage``): ``vae``, then ``unet`` (text encoder + UNet on the frozen VAE's latents); ``all`` runs both.
Each stage stops after its step count or after ``--minutes`` and is continued by running the same command again
(the same ``--out`` and settings). When both are done the model is written to ``DIR/model`` (diffusers format,
fp16, with ``training_record.json``); ``--eval N`` then samples N prompts not seen in training and judges them, and
N/2 prompts naming held-out classes, with their words and with them erased (as shipped).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from ..log import logger
from .base_model import Plan


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m embedding_trainer.toyworld.train_base", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", required=True, type=Path, help="work folder: state/ (checkpoints, caches) and model/")
    p.add_argument("--stage", choices=("vae", "unet", "all"), default="all")
    p.add_argument("--minutes", type=float, default=None, help="stop each stage after this long (resume later)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few steps on a few images (tests; not a useful model)")
    p.add_argument("--images", type=int, default=None, help="training images (default: the plan's)")
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--vae-batch", type=int, default=None)
    p.add_argument("--vae-lr", type=float, default=None)
    p.add_argument("--unet-steps", type=int, default=None)
    p.add_argument("--unet-batch", type=int, default=None)
    p.add_argument("--unet-lr", type=float, default=None)
    p.add_argument("--eval", type=int, default=0, metavar="N", help="after training: judge N sampled prompts")
    p.add_argument("--eval-vae", type=int, default=0, metavar="N", help="after the vae stage: judge N reconstructions")
    return p


def plan_from_args(args: argparse.Namespace) -> Plan:
    plan = Plan.quick(args.seed) if args.quick else Plan(seed=args.seed)
    if args.images is not None:
        plan = dataclasses.replace(plan, images=args.images)
    vae = {
        k: v for k, v in (("steps", args.vae_steps), ("batch", args.vae_batch), ("lr", args.vae_lr)) if v is not None
    }
    unet = {
        k: v for k, v in (("steps", args.unet_steps), ("batch", args.unet_batch), ("lr", args.unet_lr)) if v is not None
    }
    return dataclasses.replace(
        plan, vae=dataclasses.replace(plan.vae, **vae), unet=dataclasses.replace(plan.unet, **unet)
    )


def main(argv: list[str] | None = None) -> int:
    import torch

    from . import base_model

    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        plan = plan_from_args(args)
        started = time.monotonic()
        summary = base_model.train(
            plan, args.out, stage=args.stage, minutes=args.minutes, device=args.device, threads=args.threads
        )
        summary["wall_minutes"] = round((time.monotonic() - started) / 60, 2)
        if args.eval_vae and "vae" in summary["stages"] and summary["stages"]["vae"]["done"]:
            vae = base_model.load_trained_vae(plan, args.out)
            result = base_model.evaluate_vae(vae, args.eval_vae, device=args.device)
            base_model.image_grid(result["reconstructions"][:32]).save(args.out / "vae_reconstructions.png")
            summary["vae_eval"] = {k: v for k, v in result.items() if k not in ("reconstructions", "originals")}
        if args.eval and summary["model"]:
            model = base_model.load_model(summary["model"], device=args.device)
            exclude = {c for variants in base_model.training_captions(plan) for c in variants}
            with torch.no_grad():
                result = base_model.evaluate_samples(model, args.eval, exclude=exclude)
            base_model.image_grid(result["images"][:64]).save(args.out / "samples.png")
            summary["sample_eval"] = {k: v for k, v in result.items() if k != "images"}
            # Prompts naming the held-out classes: drawn on cue with the words, not after they are erased.
            named = base_model.trained_model(plan, args.out, erase_held_out=False).to(args.device)

            def held_out_rates() -> dict[str, object]:
                with torch.no_grad():
                    result = base_model.evaluate_samples(named, args.eval // 2, exclude=exclude, held_out=True)
                return {k: v for k, v in result.items() if k not in ("images", "prompts")}

            summary["held_out_eval"] = {"with_the_words": held_out_rates()}
            initial = base_model.build_text_encoder(plan.arch, plan.seed)
            base_model.erase_held_out_words(named.text_encoder, named.tokenizer, initial)
            summary["held_out_eval"]["shipped_words_erased"] = held_out_rates()
        print(json.dumps(summary, indent=2))
        return 0
    except base_model.BaseModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
