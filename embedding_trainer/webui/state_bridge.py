"""Maps a training run onto the WebUI's job state, so its own progress bar, ETA, live image and Interrupt work.

``/internal/progress`` derives progress from ``job_no / job_count`` plus ``sampling_step / sampling_steps`` and the
ETA from ``time_start``; the Interrupt button sets ``state.interrupted``. A run is one job whose "sampling steps"
are its optimiser steps.
"""

from __future__ import annotations

from typing import Any


class SharedStateBridge:
    """``StateBridge`` over ``modules.shared.state`` (and ``modules.progress`` for task ids, when given)."""

    def __init__(self, state: Any, progress: Any = None):
        self.state = state
        self.progress = progress
        self._task: str | None = None
        self._began = False

    def begin(self, job_id: str, total_steps: int) -> None:
        # A run started from the tab is already inside wrap_gradio_gpu_call, which began the job.
        self._began = not getattr(self.state, "job", "")
        if self._began:
            self.state.begin(job=f"task({job_id})")
            if self.progress is not None:
                self._task = f"task({job_id})"
                self.progress.start_task(self._task)
        self.state.job_count = 1
        self.state.job_no = 0
        self.state.sampling_steps = total_steps
        self.state.sampling_step = 0
        self.state.textinfo = "Embedding Trainer: preparing"

    def update(self, progress: Any, text: str) -> None:
        # A preview is a txt2img inside the run: it counts its own job and sampling steps; take them back.
        self.state.job_count = 1
        self.state.job_no = 0
        if progress is not None:
            self.state.sampling_step = progress.step
            self.state.sampling_steps = progress.total_steps
        self.state.textinfo = text

    def show_image(self, image: Any) -> None:
        self.state.assign_current_image(image)

    def interrupted(self) -> bool:
        return bool(getattr(self.state, "interrupted", False))

    def end(self) -> None:
        self.state.job_no = 1
        if self._began:
            if self.progress is not None and self._task:
                self.progress.finish_task(self._task)
            self.state.end()
        self._began = False
        self._task = None
