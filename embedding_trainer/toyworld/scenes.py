"""The toy world's classes and scenes: which shapes, colours, backgrounds, textures and sizes exist, which of them
are held out (see :mod:`.world`), the :class:`Scene` that determines one image, and how scenes are sampled (held-out
classes as often as :class:`CaptionDropout`'s default rates say, which is why it lives here).

Every scene is a pure function of a seed: :func:`sample_scene` makes a fixed sequence of draws. Numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64

ATTRIBUTES = ("shape", "colour", "background", "texture", "size")

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "moon")
#: Hue-separated, mid-lightness colours (the measured probe's VAE merged nearby colours into brown-orange).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "yellow": (240, 205, 30),
    "green": (40, 160, 60),
    "blue": (35, 80, 225),
    "purple": (140, 50, 185),
    "pink": (250, 130, 200),
}
#: Backgrounds that no shape colour comes near (nearest pair: purple on grey, about 97 RGB units apart).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "grey": (128, 128, 128),
    "black": (25, 25, 25),
    "brown": (110, 70, 40),
}
TEXTURES = ("solid", "stripes", "checks", "dots")
#: Radius bins in pixels (of the 64 px image), with gaps between them so a size is never ambiguous.
SIZES: dict[str, tuple[float, float]] = {"small": (10.5, 12.5), "medium": (15.0, 17.0), "large": (19.5, 22.5)}

CLASSES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "background": tuple(BACKGROUNDS),
    "texture": TEXTURES,
    "size": tuple(SIZES),
}

HELD_OUT_SHAPES = ("heart", "moon")
HELD_OUT_TEXTURES = ("dots",)
HELD_OUT: dict[str, tuple[str, ...]] = {"shape": HELD_OUT_SHAPES, "texture": HELD_OUT_TEXTURES}

ROTATION_RANGE = 20.0  # degrees either way: a square never turns into a diamond
TONE_RANGE = (0.9, 1.1)  # brightness jitter of the shape colour within its class
BACKGROUND_TONE_RANGE = (0.95, 1.05)


@dataclass(frozen=True)
class Scene:
    """Everything that determines one image. ``radius``, ``x`` and ``y`` are in pixels of the 64 px image."""

    shape: str
    colour: str
    background: str
    texture: str = "solid"
    size: str = "medium"
    radius: float = 16.0
    x: float = 32.0
    y: float = 32.0
    rotation: float = 0.0
    tone: float = 1.0
    background_tone: float = 1.0
    phase: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        for attribute in ATTRIBUTES:
            value = getattr(self, attribute)
            if value not in CLASSES[attribute]:
                raise ValueError(f"Scene.{attribute}={value!r}: expected one of {', '.join(CLASSES[attribute])}")
        low, high = SIZES[self.size]
        if not low <= self.radius <= high:
            raise ValueError(f"Scene.radius={self.radius}: a {self.size} shape has a radius in [{low}, {high}]")

    def attributes(self) -> dict[str, str]:
        """The judged attributes: ``{"shape": ..., "colour": ..., "background": ..., "texture": ..., "size": ...}``."""
        return {attribute: getattr(self, attribute) for attribute in ATTRIBUTES}


# ---------------------------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class CaptionDropout:
    """How often a caption leaves out each attribute of a regular class (attribute dropout).

    The default shape and texture rates also set how frequent each held-out class is in the captioned world
    (:func:`class_weights`), so changing them changes the images too, not only the captions (and so the VAE).
    """

    shape: float = 0.25
    colour: float = 0.1
    background: float = 0.2
    texture: float = 0.35
    #: Chance that a small or large shape's size is named; medium is named far less often, as people do.
    size_named: float = 0.6
    medium_named: float = 0.15


DEFAULT_DROPOUT = CaptionDropout()


def class_weights(attribute: str, uniform: bool = False, include_held_out: bool = True) -> dict[str, float]:
    """Sampling weights of ``attribute``'s classes.

    In the captioned world (``uniform=False``) each held-out class is as frequent as the dropped share of one regular
    class: rarer, as a concept outside the everyday vocabulary is. (The weights date from when held-out classes were
    only ever captioned generically and a generic word had to stay unbiased; they are kept because they fix the
    images the shipped VAE was trained on.) Judges train on ``uniform=True``.
    """
    held = HELD_OUT.get(attribute, ())
    weights = {}
    for name in CLASSES[attribute]:
        if name in held:
            if not include_held_out:
                continue
            weights[name] = 1.0 if uniform else getattr(DEFAULT_DROPOUT, attribute)
        else:
            weights[name] = 1.0
    return weights


def _choose(rng: np.random.Generator, weights: Mapping[str, float]) -> str:
    names = list(weights)
    p = np.array([weights[n] for n in names], dtype=np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def sample_scene(
    rng: np.random.Generator,
    *,
    uniform: bool = False,
    include_held_out: bool = True,
    fixed: Mapping[str, str] | None = None,
) -> Scene:
    """A random scene. ``fixed`` pins attributes (``{"shape": "heart"}``); the others are drawn from
    :func:`class_weights`. The continuous parameters (radius in its size bin, position, rotation, tones, texture
    phase) are drawn uniformly. The draw order is fixed, so a seed always gives the same scene."""
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"sample_scene: unknown attributes {sorted(unknown)}; expected some of {ATTRIBUTES}")
    chosen = {}
    for attribute in ATTRIBUTES:
        drawn = _choose(rng, class_weights(attribute, uniform, include_held_out))  # always drawn: stable streams
        chosen[attribute] = fixed.get(attribute, drawn)
    low, high = SIZES[chosen["size"]]
    radius = float(rng.uniform(low, high))
    margin = radius * 1.12 + 1.0  # the shapes reach at most 1.1 radii from their centre
    x, y = (float(v) for v in rng.uniform(margin, IMAGE_SIZE - margin, size=2))
    return Scene(
        **chosen,
        radius=radius,
        x=x,
        y=y,
        rotation=float(rng.uniform(-ROTATION_RANGE, ROTATION_RANGE)),
        tone=float(rng.uniform(*TONE_RANGE)),
        background_tone=float(rng.uniform(*BACKGROUND_TONE_RANGE)),
        phase=(float(rng.uniform()), float(rng.uniform())),
    )
