"""What a run request holds besides ``TrainConfig`` (the preview options), and the schema of both.

The API and the tab take the ``preview_*`` keys out of a request body with ``PreviewOptions.pop_from`` (validated,
naming the key) and hand the rest to ``RunManager`` as the run's config; ``config_schema`` describes both for forms
and the API (``GET /embtrain/v1/config-schema``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import TrainConfig, field_kind
from ..errors import ConfigError


@dataclass(frozen=True)
class PreviewOptions:
    """Preview images of a run: every ``every`` steps (0: none), one image of ``prompt`` with a fixed seed.

    An empty ``prompt`` means the first line of the run's template with the trigger in place. These are options of
    the run, not of the training, so they live beside ``TrainConfig`` rather than in it.
    """

    every: int = 0
    prompt: str = ""
    seed: int = 1
    steps: int = 20

    @classmethod
    def pop_from(cls, body: dict[str, Any]) -> PreviewOptions:
        """Take the ``preview_*`` keys out of a request body and validate them (``ConfigError`` names the key)."""
        values: dict[str, Any] = {}
        for option in RUN_OPTIONS:
            key = option["name"]
            if key not in body:
                continue
            value = body.pop(key)
            kind = option["type"]
            if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(key, f"{value!r} has type {type(value).__name__}; expected int")
            if kind == "str" and not isinstance(value, str):
                raise ConfigError(key, f"{value!r} has type {type(value).__name__}; expected str")
            if option["min"] is not None and value < option["min"]:
                raise ConfigError(key, f"{value!r} is below the minimum {option['min']}")
            if option["max"] is not None and value > option["max"]:
                raise ConfigError(key, f"{value!r} is above the maximum {option['max']}")
            values[key.removeprefix("preview_")] = value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f"preview_{k}": v for k, v in self.__dict__.items()}


def _run_option(
    name: str, kind: str, default: Any, text: str, minimum: int | None, maximum: int | None = None
) -> dict[str, Any]:
    return {
        "name": name,
        "type": kind,
        "default": default,
        "help": text,
        "choices": None,
        "min": minimum,
        "max": maximum,
        "min_exclusive": None,
        "accepts_number": False,
    }


#: Options of a run that are not part of ``TrainConfig`` (described like its fields, for forms and the API).
RUN_OPTIONS: tuple[dict[str, Any], ...] = (
    _run_option("preview_every", "int", 0, "Render a preview image every N steps (0: off).", 0),
    _run_option(
        "preview_prompt", "str", "", "Prompt of the previews; empty: the template's first line with the trigger.", None
    ),
    _run_option("preview_seed", "int", 1, "Seed of the previews (the same for every preview of a run).", 0, 2**32 - 1),
    _run_option("preview_steps", "int", 20, "Sampling steps of each preview.", 1, 150),
)


def config_schema() -> dict[str, Any]:
    """Every ``TrainConfig`` field (name, type, default, help, choices, limits) and the run options, JSON-ready.

    ``accepts_number``: the field is a string that also takes a number (``learning_rate``). ``min_exclusive``: the
    value must be greater than this. ``required``: fields that must be set before a run starts.
    """
    fields = []
    for f in TrainConfig.fields():
        meta = f.metadata
        fields.append(
            {
                "name": f.name,
                "type": field_kind(f),
                "default": f.default,
                "help": meta.get("help", ""),
                "choices": list(meta["choices"]) if meta.get("choices") else None,
                "min": meta.get("min"),
                "max": meta.get("max"),
                "min_exclusive": meta.get("min_exclusive"),
                "accepts_number": bool(meta.get("accepts_number", False)),
            }
        )
    return {"fields": fields, "run_options": [dict(o) for o in RUN_OPTIONS], "required": ["name", "images"]}
