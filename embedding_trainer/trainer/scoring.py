"""Where the vectors start and how they are judged: the initial vectors, ``best-word``'s ranking, the starts' seeds,
the held-out score (``eval_every``), the best vectors so far and early stopping.

The held-out score is the objective's loss on micro-batches drawn with a seed of its own, so every evaluation of a
run sees the same images, prompts, noise and timesteps.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..config import TrainConfig
from ..embedding_reading import load_embedding
from ..errors import ConfigError
from ..host import Host
from ..initialization import init_candidates, random_vectors, vectors_from_encoder_output, vectors_from_text
from ..templates import PromptBuilder
from .events import Callbacks
from .objective import Objective, seeded
from .preflight import ResumePoint
from .step import copy_into, project_norms

EVAL_BATCHES = 4
EVAL_SEED = 987654321
#: ``init_mode best-word`` ranks its candidates on micro-batches of another fixed seed (ranking on the score's own
#: views would flatter the chosen word's score at step 0).
INIT_RANK_SEED = 123456789
#: Every candidate is scored on a few micro-batches, the best few again on more (paired: the same views for all):
#: on the toy model two batches could not tell a related word from the noise between unrelated ones, eight could.
INIT_RANK_BATCHES = 4
INIT_FINALISTS = 8
INIT_FINAL_BATCHES = 16
#: An evaluation counts as an improvement (``early_stop_patience``) when it beats the best so far by this share.
EARLY_STOP_MIN_IMPROVEMENT = 0.002


def initial_vectors(config: TrainConfig, host: Host, resume: ResumePoint | None) -> tuple[dict[str, torch.Tensor], int]:
    """The vectors a run starts from (``best-word`` starts from its init text and ranks when the run starts), and
    the steps already stored with them (an init file's)."""
    if resume is not None:
        return {e.key: resume.tensors[f"vectors.{e.key}"].clone() for e in host.encoders}, resume.base_step
    if config.init_mode == "file":
        data = load_embedding(config.init_file, host.encoders)
        return {k: v.to(torch.float32).clone() for k, v in data.vectors.items()}, data.step
    if config.init_mode == "random":
        return random_vectors(host, config.num_vectors, config.seed), 0
    if config.init_mode == "encoder-output":
        return vectors_from_encoder_output(host, config.init_text, config.num_vectors), 0
    return vectors_from_text(host, config.init_text, config.num_vectors), 0


def prompt_words(prompts: PromptBuilder, captions: list[str]) -> list[str]:
    """The template's lines and the captions, without the trigger and placeholders: words the model knows."""
    lines = [line.replace("[name]", " ").replace("[filewords]", " ") for line in prompts.lines]
    return [text for text in (*lines, *captions) if text.strip()]


class Scoring:
    """The held-out scores of a run's vectors and what follows from them: the best vectors, an early stop, the word
    ``best-word`` chose and the starts' scores; and what the embedding files say about them."""

    def __init__(self, config: TrainConfig, objective: Objective, callbacks: Callbacks):
        self.config = config
        self.objective = objective
        self.callbacks = callbacks
        self.scores: dict[int, float] = {}  # held-out score by step (``eval_every``)
        self.best_step: int | None = None  # the step with the lowest held-out score so far (step 0 excluded)
        self.best_vectors: dict[str, torch.Tensor] | None = None
        self.improved_at: int | None = None  # the last evaluation that beat the earlier ones by a margin
        self.early_stopped = False
        self.init_choice = ""
        self.start_scores: list[float] = []
        self.chosen_start = 0

    def score(self, leaves: dict[str, torch.Tensor]) -> float:
        return self.objective.held_out_loss(leaves, EVAL_BATCHES, EVAL_SEED)

    def evaluate(self, step: int, leaves: dict[str, torch.Tensor], score: float | None = None) -> None:
        """Score the vectors (unless ``score`` is theirs already); keep the best ones (after step 0); stop early when
        the score has stalled."""
        if score is None:
            score = self.score(leaves)
        self.scores[step] = score
        if self.callbacks.on_evaluation:
            self.callbacks.on_evaluation(step, score)
        if step == 0 or not math.isfinite(score):
            return
        if self.best_step is None or score < self.scores[self.best_step]:
            self.best_step = step
            self.best_vectors = {k: v.detach().clone() for k, v in leaves.items()}
        last = self.improved_at
        if last is None or score < self.scores[last] * (1.0 - EARLY_STOP_MIN_IMPROVEMENT):
            self.improved_at = step
            return
        patience = self.config.early_stop_patience
        if patience and sum(1 for s in self.scores if s > last) >= patience:
            self.early_stopped = True
            self.callbacks.status(
                f"stopping early at step {step}: the held-out score has not improved for {patience} evaluations "
                f"(best {self.scores[self.best_step]:.4g} at step {self.best_step})"
            )

    def choose_init_word(
        self, host: Host, words: list[str], leaves: dict[str, torch.Tensor], word_norms: dict[str, float]
    ) -> None:
        """``init_mode best-word``: start from the candidate text with the lowest loss on fixed views of the images
        (``words``: the template's and the captions' texts)."""
        c = self.config
        candidates = init_candidates(c.init_text, words, c.name)
        trials: dict[str, dict[str, torch.Tensor]] = {}
        for text in candidates:
            with contextlib.suppress(ConfigError):  # a text with no tokens in this tokenizer
                vectors = vectors_from_text(host, text, c.num_vectors)
                trials[text] = {k: v.to(self.objective.device) for k, v in vectors.items()}
                project_norms(trials[text], word_norms, c.norm_band)
        losses: dict[str, float] = {}
        for index, (text, trial) in enumerate(trials.items(), 1):
            self.callbacks.status(f"ranking init words by loss on the images {index}/{len(trials)}")
            losses[text] = self.objective.held_out_loss(trial, INIT_RANK_BATCHES, INIT_RANK_SEED)
        finalists = sorted(losses, key=losses.__getitem__)[:INIT_FINALISTS]
        for index, text in enumerate(finalists, 1):
            self.callbacks.status(f"ranking the best {len(finalists)} init words again {index}/{len(finalists)}")
            losses[text] = self.objective.held_out_loss(trials[text], INIT_FINAL_BATCHES, INIT_RANK_SEED)
        losses = {text: losses[text] for text in finalists}
        self.init_choice = min(losses, key=losses.__getitem__)
        copy_into(leaves, trials[self.init_choice])
        others = ", ".join(f"'{t}' {losses[t]:.4g}" for t in sorted(losses, key=losses.__getitem__)[1:4])
        self.callbacks.status(f"init: '{self.init_choice}', loss {losses[self.init_choice]:.4g} (next: {others})")
        if self.callbacks.on_init_choice:
            self.callbacks.on_init_choice(self.init_choice, losses)

    # -- starts -------------------------------------------------------------------------------------------------
    def start_seed(self, index: int) -> int:
        """Each start's draws of noise, timesteps and prompts: the first start's are the run's own."""
        return self.config.seed if index == 0 else seeded(self.config.seed, "start", index)

    def score_start(self, index: int, leaves: dict[str, torch.Tensor]) -> float:
        """Score start ``index`` (0-based) at its end; returns the score to rank it by (inf for NaN)."""
        score = self.score(leaves)
        self.start_scores.append(score)
        self.callbacks.status(f"start {index + 1} of {self.config.starts}: held-out score {score:.4g}")
        return score if math.isfinite(score) else math.inf

    def choose_start(self, index: int) -> None:
        self.chosen_start = index + 1
        if len(self.start_scores) > 1:
            others = ", ".join(f"{s:.4g}" for i, s in enumerate(self.start_scores) if i != index)
            self.callbacks.status(
                f"carrying on with start {index + 1} of {len(self.start_scores)}: the lowest held-out score "
                f"{self.start_scores[index]:.4g} (the others: {others})"
            )

    # -- the result ---------------------------------------------------------------------------------------------
    def final(self, vectors: dict[str, torch.Tensor], step: int) -> tuple[dict[str, torch.Tensor], int]:
        """The vectors the file holds and their step: the last ones, or with ``final_vectors best`` the best-scored."""
        if self.config.final_vectors != "best" or self.best_vectors is None or self.best_step is None:
            return vectors, step
        if self.best_step != step:
            self.callbacks.status(
                f"the file holds step {self.best_step}'s vectors: the best held-out score of {len(self.scores)} "
                "evaluations (final_vectors best)"
            )
        return self.best_vectors, self.best_step

    def notes(self, step: int) -> dict[str, str]:
        """What an embedding file of step ``step``'s vectors says about their scores."""
        notes = {}
        if step in self.scores:
            notes["held_out_loss"] = f"{self.scores[step]:.6g}"  # the score of these very vectors
        if self.init_choice:
            notes["init_choice"] = self.init_choice
        if self.chosen_start:
            scores = ", ".join(f"{score:.6g}" for score in self.start_scores)
            notes["starts"] = f"start {self.chosen_start} of {len(self.start_scores)} (held-out scores {scores})"
        return notes
