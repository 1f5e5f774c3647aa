"""Preview images during a run, drawn by the WebUI's own txt2img pipeline with the vectors as they are now.

The training ``Embedding`` is registered live under the trigger word, so a plain txt2img of a prompt with the trigger
uses the current vectors. Two host behaviours would show a stale image instead (see ``a1111-host.md``): the
processing class caches conditioning per prompt text, not per vector values, so the cache is dropped around each
preview; and a generation normally reloads the embeddings folder, which would replace the training object with a
file's copy, so previews set ``do_not_reload_embeddings``. Images go to ``<run_dir>/previews/``, outside the
embeddings folder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..templates import preview_prompt
from .run_record import RunRecord

PREVIEW_SAMPLER = "Euler a"
PREVIEW_CFG_SCALE = 7.0


def run_preview_prompt(record: RunRecord) -> str:
    return record.preview.prompt.strip() or preview_prompt(record.config.template, record.config.name)


class PreviewRenderer:
    """``RunManager``'s ``preview`` hook for the WebUI. Called on the training thread, which holds the queue lock."""

    def __init__(
        self,
        symbols: Any,
        reset_conditioning_cache: Callable[[], None],
        show_image: Callable[[Any], None] | None = None,
        vae_on_device: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ):
        self.symbols = symbols
        self.reset_conditioning_cache = reset_conditioning_cache
        self.show_image = show_image
        self.vae_on_device = vae_on_device

    def __call__(self, record: RunRecord, step: int) -> list[Path]:
        processing = self.symbols.processing
        shared = self.symbols.shared
        config = record.config
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model,
            prompt=run_preview_prompt(record),
            negative_prompt="",
            seed=record.preview.seed,
            sampler_name=PREVIEW_SAMPLER,
            steps=record.preview.steps,
            cfg_scale=PREVIEW_CFG_SCALE,
            width=config.resolution,
            height=config.resolution,
            batch_size=1,
            n_iter=1,
            do_not_save_samples=True,
            do_not_save_grid=True,
        )
        p.do_not_reload_embeddings = True
        self.reset_conditioning_cache()
        try:
            with self.vae_on_device():
                processed = processing.process_images(p)
        finally:
            p.close()
            self.reset_conditioning_cache()  # txt2img after the run must not reuse this step's conditioning
        if not processed.images:
            raise RuntimeError("the WebUI returned no image (interrupted?)")
        folder = Path(config.effective_run_dir) / "previews"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{config.name}-step{step:06d}.png"
        image = processed.images[0]
        image.save(path)
        if self.show_image is not None:
            self.show_image(image)
        return [path]
