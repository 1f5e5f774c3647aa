"""A procedural world of coloured, textured shapes on flat backgrounds, with natural-language captions.

Every image is 64x64 RGB and a pure function of a :class:`Scene`; every scene and caption is a pure function of a
seed. The world is small on purpose: a text-to-image model trained from scratch on a CPU must be able to learn it,
and small CNN judges must be able to tell every attribute apart, also on the blurrier images a small model draws.

Held-out concepts (the benchmark for textual inversion): some shapes and one texture the base model can draw but
has no word for. Their words ("heart", "moon", "dotted", "dots") are in the training captions like any other class
word, so the UNet learns to draw them on cue, and after training their token rows in the text encoder are put back
to their initial random values (``base_model.erase_held_out_words``): the cue exists inside the model, the word no
longer reaches it. This is the situation textual inversion is for in a large model, which can draw far more than
its vocabulary names. (When the words were never in the captions at all, the UNet drew hearts only by chance from
a generic "shape", and no embedding, not even four vectors after 600 steps at batch 8, could make it draw one.)
Held-out classes are rarer than regular ones (:func:`class_weights`); the trainer never sees their words.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
#: Shapes are drawn at 4x and box-filtered down: cheap anti-aliasing that is exact and deterministic.
SUPERSAMPLE = 4

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

# Texture geometry in pixels of the 64 px image, in the shape's own (rotated) frame. Every pattern repeats at
# about an 8x VAE's latent cell or coarser (one stripe pair, check cell or dot per cell): finer checks (5 px cells)
# and dots (6.5 px apart) came back from the base model's VAE as stripes or solid (see the toy world's README),
# while these still show a few repeats on a small shape (about 20 px across).
STRIPE_PERIOD = 8.0
CHECK_CELL = 7.0
DOT_SPACING = 9.0
DOT_RADIUS = 2.6
#: The shape keeps a solid rim of its colour so a light pattern never dissolves its outline into the background.
RIM = 1.0
#: Pattern colour: the shape colour mixed with this much white.
TINT = 0.55

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


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def _unit_outline(shape: str) -> list[tuple[float, float]]:
    """The outline of ``shape`` with radius 1 around (0, 0), y pointing down, as a polygon."""
    if shape == "square":
        s = 0.78
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if shape == "triangle":
        # Equilateral, centroid lowered a little so the triangle sits in its box the way the others do.
        return [(math.cos(a) * 1.05, -math.sin(a) * 1.05 + 0.12) for a in np.radians([90, 210, 330])]
    if shape == "star":
        points = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = math.radians(90 + 36 * k)
            points.append((math.cos(a) * r, -math.sin(a) * r + 0.06))
        return points
    if shape == "cross":
        w, h = 0.32, 0.95
        arm = [(-w, -h), (w, -h), (w, -w)]  # one arm; the others are its quarter turns
        return [(x * c - y * s, x * s + y * c) for c, s in ((1, 0), (0, 1), (-1, 0), (0, -1)) for x, y in arm]
    if shape == "heart":
        t = np.linspace(0.0, 2 * math.pi, 96, endpoint=False)
        hx = 16 * np.sin(t) ** 3
        hy = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        return [(float(a) / 16.5, -(float(b) + 2.5) / 16.5) for a, b in zip(hx, hy)]
    raise ValueError(f"no polygon for shape {shape!r}")


def _transform(points: Iterable[tuple[float, float]], scene: Scene) -> list[tuple[float, float]]:
    """Unit coordinates -> supersampled pixel coordinates (scale, rotate, move)."""
    c, s = math.cos(math.radians(scene.rotation)), math.sin(math.radians(scene.rotation))
    out = []
    for u, v in points:
        px = scene.x + scene.radius * (c * u - s * v)
        py = scene.y + scene.radius * (s * u + c * v)
        out.append((px * SUPERSAMPLE, py * SUPERSAMPLE))
    return out


def _disc(draw: ImageDraw.ImageDraw, scene: Scene, centre: tuple[float, float], radius: float, fill: int) -> None:
    (cx, cy), r = _transform([centre], scene)[0], radius * scene.radius * SUPERSAMPLE
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)


def shape_mask(scene: Scene) -> np.ndarray:
    """Boolean mask of the shape at the supersampled resolution."""
    size = IMAGE_SIZE * SUPERSAMPLE
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if scene.shape == "circle":
        _disc(draw, scene, (0.0, 0.0), 0.92, 255)
    elif scene.shape == "moon":
        # A crescent opening to the right: a disc with a smaller, offset disc cut out.
        _disc(draw, scene, (0.0, 0.0), 0.95, 255)
        _disc(draw, scene, (0.55, -0.12), 0.72, 0)
    else:
        draw.polygon(_transform(_unit_outline(scene.shape), scene), fill=255)
    return np.asarray(mask) > 127


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by a (2r+1)-square, separably: shrinks the shape to leave its rim."""
    out = mask
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], constant_values=False)
        n = out.shape[axis]
        acc = np.ones_like(out)
        for k in range(2 * radius + 1):
            acc &= np.take(padded, range(k, k + n), axis=axis)
        out = acc
    return out


def pattern_mask(scene: Scene, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
    """Where the texture's light colour goes (supersampled, before clipping to the shape's inside); ``rows`` and
    ``cols`` select a window of the canvas so only the shape's box is computed."""
    size = IMAGE_SIZE * SUPERSAMPLE
    coords = (np.arange(size, dtype=np.float64) + 0.5) / SUPERSAMPLE
    px, py = np.meshgrid(coords[cols] - scene.x, coords[rows] - scene.y)
    if scene.texture == "solid":
        return np.zeros(px.shape, dtype=bool)
    c, s = math.cos(math.radians(scene.rotation)), math.sin(math.radians(scene.rotation))
    u, v = c * px + s * py, -s * px + c * py  # the shape's own frame: the texture turns with the shape
    if scene.texture == "stripes":
        t = (u + v) / math.sqrt(2.0) / STRIPE_PERIOD + scene.phase[0]
        return (t - np.floor(t)) < 0.5
    if scene.texture == "checks":
        i = np.floor(u / CHECK_CELL + scene.phase[0]) + np.floor(v / CHECK_CELL + scene.phase[1])
        return (i % 2) == 0
    # dots: a hexagonal grid, every other row shifted by half a spacing, with a dot near the shape's centre (the
    # phase only jitters it by a tenth of a spacing): a small star's points are narrower than a dot's spacing, so a
    # freely placed grid could leave a dotted small shape without a dot.
    pu, pv = (scene.phase[0] - 0.5) * 0.2, (scene.phase[1] - 0.5) * 0.2
    row_height = DOT_SPACING * math.sqrt(3.0) / 2.0
    row = np.round(v / row_height + pv)
    shift = (row % 2) * 0.5
    col = np.round(u / DOT_SPACING + pu - shift)
    du = u - (col - pu + shift) * DOT_SPACING
    dv = v - (row - pv) * row_height
    return du * du + dv * dv <= DOT_RADIUS * DOT_RADIUS


def shape_rgb(scene: Scene) -> np.ndarray:
    return np.clip(np.array(COLOURS[scene.colour], dtype=np.float64) * scene.tone, 0, 255)


def _block_mean(mask: np.ndarray) -> np.ndarray:
    """Fraction of each output pixel's 4x4 block that ``mask`` covers."""
    return mask.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE).sum(axis=(1, 3)) / SUPERSAMPLE**2


def render(scene: Scene) -> Image.Image:
    """The 64x64 RGB image of ``scene``: deterministic, anti-aliased (drawn at 4x, box-filtered down).

    Each output pixel mixes background, shape colour and pattern tint by how much of its 4x4 block each covers.
    """
    background = np.clip(np.array(BACKGROUNDS[scene.background], dtype=np.float64) * scene.background_tone, 0, 255)
    colour = shape_rgb(scene)
    tint = colour * (1.0 - TINT) + 255.0 * TINT
    mask = shape_mask(scene)
    pattern = np.zeros_like(mask)
    if scene.texture != "solid" and mask.any():
        # Only the shape's box (plus the erosion margin) needs the texture.
        rim = round(RIM * SUPERSAMPLE)
        ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        rows = slice(max(ys[0] - rim, 0), ys[-1] + rim + 1)
        cols = slice(max(xs[0] - rim, 0), xs[-1] + rim + 1)
        inside = _erode(mask[rows, cols], rim)
        pattern[rows, cols] = inside & pattern_mask(scene, rows, cols)
    covered, tinted = _block_mean(mask)[..., None], _block_mean(pattern)[..., None]
    pixels = background * (1.0 - covered) + colour * (covered - tinted) + tint * tinted
    return Image.fromarray(np.round(pixels).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------------------------
# Captions

SHAPE_WORDS = {
    "circle": "circle",
    "square": "square",
    "triangle": "triangle",
    "star": "star",
    "cross": "cross",
    "heart": "heart",
    "moon": "moon",
}
GENERIC_SHAPE_WORDS = ("shape", "object", "figure", "symbol")
COLOUR_WORDS = {name: (name,) for name in COLOURS}
BACKGROUND_WORDS = {"white": ("white",), "grey": ("grey", "gray"), "black": ("black",), "brown": ("brown",)}
SIZE_WORDS = {"small": ("small",), "medium": ("medium",), "large": ("large", "big")}
#: Texture words as an adjective before the noun and as a noun after "with".
TEXTURE_ADJECTIVES = {"solid": ("plain", "solid"), "stripes": ("striped",), "checks": ("checked",), "dots": ("dotted",)}
TEXTURE_NOUNS = {"stripes": ("stripes",), "checks": ("checks",), "dots": ("dots",)}
PREFIXES = ("", "", "a photo of ", "a picture of ", "an image of ", "a drawing of ", "an icon of ")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def caption(scene: Scene, rng: np.random.Generator, dropout: CaptionDropout = DEFAULT_DROPOUT) -> str:
    """A natural, varied caption of ``scene`` (held-out classes are named like the others; see the module notes).

    ``"a small red star on a grey background"``, ``"a striped circle in blue, white background"``,
    ``"a photo of a green shape with checks against a black background"``. A fixed number of random draws is
    made whatever the scene, so captions of different scenes from one stream stay aligned.
    """
    u = rng.uniform(size=6)
    template = int(rng.integers(4))
    prefix = _pick(rng, PREFIXES)
    generic = _pick(rng, GENERIC_SHAPE_WORDS)
    colour = _pick(rng, COLOUR_WORDS[scene.colour])
    background = _pick(rng, BACKGROUND_WORDS[scene.background])
    size_word = _pick(rng, SIZE_WORDS[scene.size])
    adjective = _pick(rng, TEXTURE_ADJECTIVES.get(scene.texture, ("",)))
    texture_noun = _pick(rng, TEXTURE_NOUNS.get(scene.texture, ("",)))
    background_style = int(rng.integers(4))

    noun = generic if u[0] < dropout.shape else SHAPE_WORDS[scene.shape]
    colour = "" if u[1] < dropout.colour else colour
    show_background = u[2] >= dropout.background
    texture_named = u[3] >= dropout.texture
    size_named = u[4] < (dropout.medium_named if scene.size == "medium" else dropout.size_named)
    size_word = size_word if size_named else ""
    if not TEXTURE_NOUNS.get(scene.texture) and template == 2:
        template = 0  # "with plain" is not English: solid textures take the adjective form

    adjective = adjective if texture_named else ""
    if template == 0:  # a small red striped star
        phrase = [size_word, colour, adjective, noun]
    elif template == 1:  # a small striped star in red
        phrase = [size_word, adjective, noun] + (["in", colour] if colour else [])
    elif template == 2:  # a small red star with stripes
        phrase = [size_word, colour, noun] + (["with", texture_noun] if texture_named else [])
    else:  # a small striped red star
        phrase = [size_word, adjective, colour, noun]
    words = " ".join(w for w in phrase if w)
    text = f"{prefix}a {words}"
    if show_background:
        if background_style == 0:
            text += f" on a {background} background"
        elif background_style == 1:
            text += f", {background} background"
        elif background_style == 2:
            text += f" against a {background} background"
        else:
            text = f"{background} background, {text}"
    return text


def example(seed: int, index: int, dropout: CaptionDropout = DEFAULT_DROPOUT) -> tuple[Scene, str]:
    """The ``index``-th (scene, caption) pair of the captioned world with ``seed``: random access, deterministic."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng)
    return scene, caption(scene, rng, dropout)


def caption_vocabulary() -> set[str]:
    """Every word a caption can contain."""
    words = {"a", "an", "of", "in", "with", "on", "against", "background", *SHAPE_WORDS.values(), *GENERIC_SHAPE_WORDS}
    for table in (COLOUR_WORDS, BACKGROUND_WORDS, SIZE_WORDS, TEXTURE_ADJECTIVES, TEXTURE_NOUNS):
        for options in table.values():
            words.update(options)
    for prefix in PREFIXES:
        words.update(prefix.split())
    return words


def caption_words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


# ---------------------------------------------------------------------------------------------------------------
# Held-out concepts


@dataclass(frozen=True)
class HeldOutConcept:
    """A concept the base model can draw but has no word for: the benchmark's subject for textual inversion.

    ``attributes`` is what the judges must see for an image to show the concept; ``kind`` says how a prompt uses
    the placeholder: an ``"object"`` is a noun ("a <x> in blue"), a ``"texture"`` or ``"colour"`` an adjective
    ("a blue <x> star", "a <x> striped star"), a ``"background"`` names the backdrop ("a star on a <x> background").
    ``forbidden`` are word stems that must never start a word of a training caption.
    ``erase`` are caption words the benchmark erases from the model's text encoder for this concept only (as the
    shipped model's held-out words are erased for good): the concept's word no longer reaches what the UNet learnt.
    """

    name: str
    kind: str
    attributes: dict[str, str]
    forbidden: tuple[str, ...]
    description: str
    #: Attributes the user photos keep varied and that an edit prompt may request.
    editable: tuple[str, ...] = field(default=())
    erase: tuple[str, ...] = field(default=())
    #: The caption words that name the concept on the model as shipped, where it has them (erased only for a run,
    #: or a binding of known words): prompts with them tell how well any word for it can edit.
    own_words: str = ""

    def shown(self, attributes: Mapping[str, str]) -> bool:
        return all(attributes.get(k) == v for k, v in self.attributes.items())


HELD_OUT_CONCEPTS: dict[str, HeldOutConcept] = {
    c.name: c
    for c in (
        HeldOutConcept(
            "heart",
            "object",
            {"shape": "heart"},
            ("heart", "love", "valentine"),
            "a heart shape; the shape judge must say 'heart'",
            ("colour", "background", "texture", "size"),
        ),
        HeldOutConcept(
            "moon",
            "object",
            {"shape": "moon"},
            ("moon", "crescent", "lunar", "sickle"),
            "a crescent moon shape; the shape judge must say 'moon'",
            ("colour", "background", "texture", "size"),
        ),
        HeldOutConcept(
            "dots",
            "texture",
            {"texture": "dots"},
            ("dot", "spot", "polka", "speck", "dapple"),
            "a polka-dot texture on any shape; the texture judge must say 'dots'",
            ("shape", "colour", "background", "size"),
        ),
        HeldOutConcept(
            "checked_star",
            "object",
            {"shape": "star", "texture": "checks"},
            (),
            "a checked star (both words are known; the concept is their binding); shape 'star' and texture 'checks'",
            ("colour", "background", "size"),
            own_words="checked star",
        ),
        # Concepts made by erasing one more word of the shipped model, for this concept only (``erase``).
        HeldOutConcept(
            "purple",
            "colour",
            {"colour": "purple"},
            (),
            "the colour purple on any shape, its word erased; the colour judge must say 'purple'",
            ("shape", "background", "texture", "size"),
            erase=("purple",),
            own_words="purple",
        ),
        HeldOutConcept(
            "cross",
            "object",
            {"shape": "cross"},
            (),
            "a cross shape, its word erased; the shape judge must say 'cross'",
            ("colour", "background", "texture", "size"),
            erase=("cross",),
            own_words="cross",
        ),
        HeldOutConcept(
            "striped_circle",
            "object",
            {"shape": "circle", "texture": "stripes"},
            (),
            "a striped circle (a second binding of two known words); shape 'circle' and texture 'stripes'",
            ("colour", "background", "size"),
            own_words="striped circle",
        ),
        HeldOutConcept(
            "brown_background",
            "background",
            {"background": "brown"},
            (),
            "a brown backdrop behind any shape (a style of the whole picture), its word erased",
            ("shape", "colour", "texture", "size"),
            erase=("brown",),
            own_words="brown",
        ),
    )
}


def forbidden_stems() -> tuple[str, ...]:
    return tuple(stem for concept in HELD_OUT_CONCEPTS.values() for stem in concept.forbidden)


def held_out_words() -> tuple[str, ...]:
    """The caption words that name held-out classes: the base model learns them, then its text encoder forgets them
    (``base_model.erase_held_out_words``)."""
    words = [SHAPE_WORDS[shape] for shape in HELD_OUT_SHAPES]
    for texture in HELD_OUT_TEXTURES:
        words += [*TEXTURE_ADJECTIVES.get(texture, ()), *TEXTURE_NOUNS.get(texture, ())]
    return tuple(words)


def caption_violations(texts: Iterable[str], held_out_allowed: bool = False) -> list[str]:
    """Problems with ``texts``: a word outside :func:`caption_vocabulary`, or (unless ``held_out_allowed``, as for
    the base model's own training captions) a word that starts with a held-out concept's stem, which the textual
    inversion side (templates, prompts) must never use. Empty when the texts are clean."""
    stems = forbidden_stems()
    vocabulary = caption_vocabulary()
    problems = []
    for text in texts:
        for word in caption_words(text):
            if word not in vocabulary:
                problems.append(f"{text!r}: {word!r} is not in the caption vocabulary")
            elif word.startswith(stems) and not held_out_allowed:
                problems.append(f"{text!r}: {word!r} names a held-out concept")
    return problems


def user_photo_scenes(concept: HeldOutConcept | str, n: int, seed: int = 0) -> list[Scene]:
    """``n`` scenes that show ``concept``, its other attributes varied over the regular (non-held-out) classes."""
    concept = HELD_OUT_CONCEPTS[concept] if isinstance(concept, str) else concept
    rng = np.random.default_rng([seed, 7919])
    return [sample_scene(rng, uniform=True, include_held_out=False, fixed=concept.attributes) for _ in range(n)]


def user_photos(concept: HeldOutConcept | str, n: int = 5, seed: int = 0) -> list[Image.Image]:
    """The "user photos" of ``concept``: what a user would hand the trainer (without the concept's word)."""
    return [render(scene) for scene in user_photo_scenes(concept, n, seed)]


@dataclass(frozen=True)
class EditCase:
    """A prompt with the placeholder and what the judges must see in its images."""

    prompt: str
    expected: dict[str, str]


def reconstruction_prompts(concept: HeldOutConcept | str, placeholder: str) -> list[EditCase]:
    concept = HELD_OUT_CONCEPTS[concept] if isinstance(concept, str) else concept
    prompts = {
        "object": [f"a photo of a {placeholder}", f"a {placeholder}"],
        "texture": [f"a photo of a {placeholder} shape", f"a {placeholder} object"],
        "colour": [f"a photo of a {placeholder} shape", f"a {placeholder} object"],
        "background": [f"a photo of a shape on a {placeholder} background", f"an object, {placeholder} background"],
    }[concept.kind]
    return [EditCase(p, dict(concept.attributes)) for p in prompts]


def edit_cases(concept: HeldOutConcept | str, placeholder: str, n: int = 8, seed: int = 0) -> list[EditCase]:
    """New compositions: the concept with requested attributes, e.g. ``"a <x> in blue on a white background"``."""
    concept = HELD_OUT_CONCEPTS[concept] if isinstance(concept, str) else concept
    rng = np.random.default_rng([seed, 104729])
    cases = []
    for i in range(n):
        want = sample_scene(rng, uniform=True, include_held_out=False, fixed=concept.attributes).attributes()
        colour, background, shape = want["colour"], want["background"], want["shape"]
        expected = {**concept.attributes, "colour": colour, "background": background}
        texture = TEXTURE_ADJECTIVES[want["texture"]][-1]  # "solid", "striped", "checked"
        if concept.kind == "texture":
            expected["shape"] = shape
            prompt = f"a {colour} {placeholder} {shape} on a {background} background"
        elif concept.kind == "colour":
            expected = {**concept.attributes, "texture": want["texture"], "shape": shape, "background": background}
            prompt = f"a {texture} {placeholder} {shape} on a {background} background"
        elif concept.kind == "background":
            expected = {**concept.attributes, "colour": colour, "shape": shape}
            if i % 2 == 0:
                prompt = f"a {colour} {shape} on a {placeholder} background"
            else:
                expected["texture"] = want["texture"]
                prompt = f"{placeholder} background, a {texture} {colour} {shape}"
        elif i % 2 == 0:
            prompt = f"a {placeholder} in {colour} on a {background} background"
        else:
            prompt = f"a {want['size']} {colour} {placeholder}, {background} background"
            expected["size"] = want["size"]
        cases.append(EditCase(prompt, expected))
    return cases
