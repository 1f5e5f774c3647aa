"""One run of the loop: the set-up on the device, the starts, and the step loop (the same loop for the starts and
for the run) with its reports, evaluations and saves. Parts in; the step reached and whether it was stopped out.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ..config import TrainConfig
from ..cpu_threads import ThreadTuner
from ..distributed import Processes
from ..host import Host
from .events import Callbacks
from .objective import Objective
from .outputs import Outputs
from .run_log import PendingStep, RunLog
from .scoring import Scoring
from .step import Stepper


class RunLoop:
    """Trains ``stepper``'s vectors from ``start_step`` to ``max_steps``, a stop or an early stop (``step``: where
    it is); ``prompt_words`` are the candidates' sources for ``best-word``."""

    def __init__(
        self,
        config: TrainConfig,
        host: Host,
        objective: Objective,
        scoring: Scoring,
        stepper: Stepper,
        run_log: RunLog,
        outputs: Outputs,
        callbacks: Callbacks,
        processes: Processes,
        start_step: int,
        prompt_words: list[str],
    ):
        self.config = config
        self.host = host
        self.objective = objective
        self.scoring = scoring
        self.stepper = stepper
        self.run_log = run_log
        self.outputs = outputs
        self.callbacks = callbacks
        self.processes = processes
        self.prompt_words = prompt_words
        self.tuner = ThreadTuner(objective.device)
        self.step = start_step  # the run's steps done (a start's are not the run's until it is chosen)
        self.loop_start = 0.0  # when the steps began (time.perf_counter)
        self.initial_vectors: dict[str, torch.Tensor] = {}  # what training started from, on the CPU

    def run(self) -> bool:
        """Train; returns whether a stop was asked. A failure raises an error that says where the last good vectors
        are kept (``Outputs.failure``)."""
        c = self.config
        pending: list[PendingStep] = []
        stopped = False
        with self.run_log.file, self.host.training_session(c.gradient_checkpointing):
            try:
                self._set_up()
                if c.starts > 1 and self.step == 0:
                    stopped = self._starts()
                self.callbacks.status("training")
                if not stopped:
                    stopped = self._steps(c.max_steps, None, pending)
                self.run_log.report(pending, self.stepper.leaves)  # a stop leaves steps to report
                self.stepper.check_agree(f"the end of the run (step {self.step})")
            except BaseException as error:
                log = self.run_log
                raise self.outputs.failure(error, self.step, log.good_step, log.good_vectors) from error
            finally:
                self.tuner.restore()
        return stopped

    def _set_up(self) -> None:
        c, leaves = self.config, self.stepper.leaves
        self.objective.fill_cache()
        if c.vae_to_cpu:
            self.callbacks.status("moving the VAE to system RAM (every latent is cached)")
            self.host.offload_image_encoder()
        if c.init_mode == "best-word" and not c.resume:
            self.scoring.choose_init_word(self.host, self.prompt_words, leaves, self.stepper.word_norms)
        self.stepper.project_norms()
        self.processes.check_identical(leaves, "the starting vectors")
        self.run_log.keep_good(leaves)
        self.initial_vectors = {k: v.detach().cpu().clone() for k, v in leaves.items()}
        if c.eval_every and self.step == 0:
            self.scoring.evaluate(0, leaves)  # the baseline the chart and the best-vectors choice start from
        self.loop_start = self.stepper.last_report = time.perf_counter()

    def _steps(self, end: int, seed: int | None, pending: list[PendingStep], start: int | None = None) -> bool:
        """The step loop up to step ``end``, for the run (from ``step``) or for start ``start`` (from 0, with its own
        ``seed``; its steps wait in ``pending`` until the starts are compared). Returns whether a stop was asked."""
        step = self.step if start is None else 0
        last_status = time.perf_counter()
        while step < end and not self.scoring.early_stopped:
            if self.stepper.stop_asked(self.callbacks.should_stop):
                return True
            loss, lr = self.stepper.take(step, seed)
            step += 1
            now = time.perf_counter()
            pending.append(PendingStep(step, loss, lr, now - self.loop_start))  # this run's own time
            if start is None:
                self.step = step
                self._after_step(pending, now)
            elif now - last_status >= self.stepper.report_interval_s:
                self.callbacks.status(f"start {start + 1} of {self.config.starts}: step {step}/{end}")
                last_status = now
        return False

    def _after_step(self, pending: list[PendingStep], now: float) -> None:
        """A run step's report (at most every ``REPORT_INTERVAL_S``, and at every save, evaluation and the end),
        evaluation, ``on_step`` and save."""
        c, step, leaves = self.config, self.step, self.stepper.leaves
        self.tuner.after_step()
        saving = bool(c.save_every and step % c.save_every == 0 and step < c.max_steps)
        evaluating = bool(c.eval_every and (step % c.eval_every == 0 or step == c.max_steps))
        if saving or evaluating or step == c.max_steps or self.stepper.report_due(now):
            self.run_log.report(pending, leaves)  # an evaluation's score comes after its step's loss
            self.stepper.last_report = now
        if evaluating:
            self.scoring.evaluate(step, leaves)
        if self.callbacks.on_step:
            self.callbacks.on_step(step, self.stepper.detached())
        if saving:
            self.stepper.check_agree(f"the save at step {step}")
            self.outputs.save_intermediate(step, self.run_log.good_vectors, self.stepper.optimizer, self.stepper.scaler)
            self.run_log.sync()  # the loss rows up to this save survive a kill, as the save does
            self.outputs.prune_saves()

    def _starts(self) -> bool:
        """``starts``: train each start ``start_steps`` from the same vectors, each with its own draws of noise,
        timesteps and prompts (the first with the run's own seed, so it is what a one-start run does), and carry on
        with the one of lowest held-out score, its optimiser state included. Returns whether a stop was asked.

        Whether a run finds its concept can hinge on its random draws; with several vectors the held-out score
        mostly tells the starts that found it from those that did not (benchmarks/RESULTS.md, "same photos")."""
        c = self.config
        length = min(c.start_steps, c.max_steps)
        initial = self.stepper.clone()
        best: tuple[float, int, tuple, list[PendingStep]] | None = None
        stopped = False
        for index in range(c.starts):
            self.stepper.restart(initial)  # each start has its own AdamW moments (and fp16 loss scale)
            pending: list[PendingStep] = []
            stopped = self._steps(length, self.scoring.start_seed(index), pending, start=index)
            if stopped and best is not None:
                break  # keep the best finished start
            rank = self.scoring.score_start(index, self.stepper.leaves)
            if best is None or rank < best[0]:
                best = (rank, index, self.stepper.snapshot(), pending)
            if stopped:
                break
        assert best is not None  # at least one start ran (or was stopped, and is kept)
        _, index, snapshot, pending = best
        self.stepper.restore(snapshot)
        self.scoring.choose_start(index)
        done = pending[-1].step if pending else 0
        self.run_log.other_starts_steps = len(self.scoring.start_scores) * length - done if not stopped else 0
        # The chosen start's steps become the run's first steps, timed to end now: the other starts' time is spent
        # too, so the speed and the ETA count it.
        shift = time.perf_counter() - self.loop_start - pending[-1].elapsed_s if pending else 0.0
        pending = [dataclasses.replace(entry, elapsed_s=entry.elapsed_s + shift) for entry in pending]
        self.run_log.report(pending, self.stepper.leaves)
        if done and c.eval_every:
            score = self.scoring.start_scores[index] if done == length else None
            self.scoring.evaluate(done, self.stepper.leaves, score)
        if done and self.callbacks.on_step:
            self.callbacks.on_step(done, self.stepper.detached())
        self.step = done
        return stopped
