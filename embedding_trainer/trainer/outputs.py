"""A run's files: the embedding (and its ``.pt`` copy and picture card), intermediate saves with their optimiser
state, the last good vectors when a run fails and the message that says why, and a killed run's leftovers.

Only process 0 of a data-parallel run writes (the others would race it for the same files); elsewhere every method
returns the path it would have written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..config import TrainConfig
from ..distributed import Processes
from ..embedding_file import EmbeddingData, save_embedding
from ..errors import TrainingError
from ..host import Host
from ..run_state import STATE_SUFFIX, save_state
from .events import Callbacks


def remove_leftovers(config: TrainConfig, run_dir: Path, output_path: Path) -> None:
    """Temporary files a killed run left behind (``write_atomically`` names them ``.<target>.<random>.tmp``)."""
    name = config.name
    places = {
        run_dir: (f".{name}", ".loss.csv.", ".config.json."),
        run_dir / "saves": (f".{name}",),
        output_path.parent: (f".{name}.safetensors.", f".{name}.pt."),
    }
    for folder, prefixes in places.items():
        if folder.is_dir():
            for leftover in folder.glob(".*.tmp"):
                if leftover.name.startswith(prefixes):
                    with contextlib.suppress(OSError):
                        leftover.unlink()


def _is_out_of_memory(error: BaseException) -> bool:
    """CUDA's ``OutOfMemoryError`` (a RuntimeError) or the plain RuntimeError other backends raise."""
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


class Outputs:
    """Writes the embedding files of a run. ``notes(step)``: what a file of step ``step``'s vectors says about their
    scores; ``base_step``: the steps stored with the initial vectors (an init file's), added to the file's step."""

    def __init__(
        self,
        config: TrainConfig,
        host: Host,
        run_dir: Path,
        output_path: Path,
        base_step: int,
        processes: Processes,
        callbacks: Callbacks,
        notes: Callable[[int], dict[str, str]],
    ):
        self.config = config
        self.host = host
        self.run_dir = run_dir
        self.output_path = output_path
        self.base_step = base_step
        self.processes = processes
        self.writes_files = processes.writes_files
        self.callbacks = callbacks
        self.notes = notes

    def _embedding(self, vectors: dict[str, torch.Tensor], step: int, run_steps: int | None = None) -> EmbeddingData:
        """``step``: the run step of ``vectors``; ``run_steps``: the steps the run had done (later, for the best
        vectors at the end of a run)."""
        meta = {
            "base_model_name": self.host.model_name,
            "family": self.host.family,
            "prediction_type": self.host.prediction_type,
            "trainer": f"embedding_trainer {__version__}",
            "run_steps": str(step if run_steps is None else run_steps),
            "vectors_step": str(step),
            "settings": self.config.to_json(),
            **self.notes(step),
        }
        return EmbeddingData(name=self.config.name, vectors=vectors, step=self.base_step + step, metadata=meta)

    def write(
        self,
        path: Path,
        vectors: dict[str, torch.Tensor],
        step: int,
        overwrite: bool,
        picture: Any = None,
        run_steps: int | None = None,
    ) -> Path:
        if not self.writes_files:
            return path
        written = save_embedding(self._embedding(vectors, step, run_steps), path, overwrite=overwrite, picture=picture)
        if self.callbacks.on_save:
            self.callbacks.on_save(written, step)
        return written

    def write_result(
        self, vectors: dict[str, torch.Tensor], step: int, run_steps: int, replace: bool
    ) -> tuple[Path, list[Path]]:
        """The run's embedding file, and the ``.pt`` copy and picture card when asked for."""
        path = self.write(self.output_path, vectors, step, overwrite=replace, run_steps=run_steps)
        extra = []
        if self.config.write_pt:
            extra.append(self.write(path.with_suffix(".pt"), vectors, step, overwrite=replace, run_steps=run_steps))
        if self.config.write_card:
            extra.append(self._write_card(vectors, step, run_steps))
        return path, extra

    def _write_card(self, vectors: dict[str, torch.Tensor], step: int, run_steps: int) -> Path:
        """The WebUI's picture card in the run folder (not the embeddings folder, where the WebUI would load it as a
        second embedding with the same trigger), showing ``card_picture``, else the first preview, else a tile."""
        from PIL import Image

        if not self.writes_files:
            return self.run_dir / f"{self.config.name}.png"
        previews = sorted((self.run_dir / "previews").glob("*.png"))
        source = self.config.card_picture or (str(previews[0]) if previews else "")
        picture = None
        if source:
            try:
                with Image.open(source) as opened:
                    picture = opened.convert("RGB")
            except OSError as e:
                self.callbacks.warn(f"card_picture {source} cannot be read ({e}); the card shows a plain tile")
        return self.write(self.run_dir / f"{self.config.name}.png", vectors, step, True, picture, run_steps)

    def save_intermediate(
        self, step: int, vectors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, scaler: Any
    ) -> Path:
        """The vectors of ``step`` and the state a resume goes on from (``saves/``); returns the state's path."""
        saves = self.run_dir / "saves"
        state_path = saves / f"{self.config.name}-{step:06d}{STATE_SUFFIX}"
        if not self.writes_files:
            return state_path
        self.write(saves / f"{self.config.name}-{step:06d}.safetensors", vectors, step, overwrite=True)
        save_state(state_path, vectors, optimizer, scaler, step, self.base_step, self.config.to_json())
        return state_path

    def prune_saves(self) -> None:
        """Keep the newest ``keep_saves`` intermediate saves."""
        if not self.writes_files or not self.config.keep_saves:
            return
        states = sorted((self.run_dir / "saves").glob(f"{self.config.name}-*{STATE_SUFFIX}"))
        for old in states[: -self.config.keep_saves]:
            old.unlink(missing_ok=True)
            old.with_name(old.name.replace(STATE_SUFFIX, ".safetensors")).unlink(missing_ok=True)

    def failure(
        self, error: BaseException, step: int, good_step: int, good_vectors: dict[str, torch.Tensor]
    ) -> BaseException:
        """Keep the last good vectors on disk and say where they are (``step``: the steps done when it failed)."""
        saved = self.write(self.run_dir / f"{self.config.name}-last-good.safetensors", good_vectors, good_step, True)
        if isinstance(error, KeyboardInterrupt):
            return error
        where = f"\nLast good embedding (step {good_step}): {saved}"
        if not self.writes_files:
            where = f"\n(process 0 keeps the files; this is process {self.processes.rank})"
        if isinstance(error, TrainingError):
            return type(error)(f"{error}{where}")  # LostProcessesError stays one
        if _is_out_of_memory(error):
            c = self.config
            return TrainingError(
                f"the device ran out of memory at step {step + 1} (batch_size {c.batch_size} at {c.resolution} px). "
                f"Lower batch_size and raise grad_accum to keep the same images per step (e.g. batch_size "
                f"{max(1, c.batch_size // 2)}, grad_accum {c.grad_accum * 2}), or turn on gradient_checkpointing "
                f"or vae_to_cpu. ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}){where}"
            )
        return TrainingError(f"training failed at step {step + 1}: {type(error).__name__}: {error}{where}")
