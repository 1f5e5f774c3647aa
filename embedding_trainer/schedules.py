"""Learning-rate schedules: the WebUI's piecewise string, and constant / linear / cosine with warm-up.

Steps are the optimiser steps of this run, counted from 0 (the WebUI counts absolute embedding steps, which
confuses users who continue training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class LearningRate:
    """``pieces`` is a list of (rate, until_step); the last piece has ``until_step=None`` (until the end)."""

    pieces: tuple[tuple[float, int | None], ...]

    @property
    def is_piecewise(self) -> bool:
        return len(self.pieces) > 1

    @property
    def base(self) -> float:
        return self.pieces[0][0]


def parse_learning_rate(text: str, field: str = "learning_rate") -> LearningRate:
    """Parse ``"0.005"`` or ``"0.005:100, 1e-3:1000, 1e-5"`` (rate until step; ``-1`` or no step: to the end)."""
    pieces: list[tuple[float, int | None]] = []
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise ConfigError(field, "is empty; give a rate such as 0.005 or a schedule such as '0.005:100, 1e-3'")
    last_until = 0
    for i, item in enumerate(items):
        rate_text, _, until_text = item.partition(":")
        try:
            rate = float(rate_text)
        except ValueError:
            raise ConfigError(
                field,
                f"{rate_text.strip()!r} in {text!r} is not a number; give a rate such as 0.005, or the WebUI's "
                "schedule form '0.005:100, 1e-3:1000, 1e-5' (rate until step)",
            ) from None
        if not math.isfinite(rate) or rate <= 0:
            raise ConfigError(field, f"rate {rate_text.strip()!r} in {text!r} must be a positive number")
        until: int | None = None
        if until_text.strip():
            try:
                until = int(until_text)
            except ValueError:
                raise ConfigError(field, f"step {until_text.strip()!r} in {text!r} is not a whole number") from None
            if until == -1:
                until = None
            elif until <= last_until:
                raise ConfigError(field, f"steps in {text!r} must increase; {until} does not come after {last_until}")
            else:
                last_until = until
        if until is None and i != len(items) - 1:
            raise ConfigError(field, f"only the last piece of {text!r} may run to the end (no ':step')")
        pieces.append((rate, until))
    if pieces[-1][1] is not None:
        # The WebUI stops training when the last piece ends; we keep its rate instead, since max_steps decides.
        pieces[-1] = (pieces[-1][0], None)
    return LearningRate(tuple(pieces))


def learning_rate_at(step: int, schedule: LearningRate, scheduler: str, warmup_steps: int, total_steps: int) -> float:
    """The learning rate for optimiser step ``step`` (0-based) of a run of ``total_steps`` steps."""
    if schedule.is_piecewise:
        rate = schedule.pieces[-1][0]
        for piece_rate, until in schedule.pieces:
            if until is None or step < until:
                rate = piece_rate
                break
    else:
        rate = schedule.base
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
        if scheduler == "linear":
            rate *= 1.0 - progress
        elif scheduler == "cosine":
            rate *= 0.5 * (1.0 + math.cos(math.pi * progress))
    if warmup_steps and step < warmup_steps:
        rate *= (step + 1) / (warmup_steps + 1)
    return rate
