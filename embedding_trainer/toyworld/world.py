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
Held-out classes are rarer than regular ones (:func:`.scenes.class_weights`); the trainer never sees their words.

The scenes and their sampling are in ``scenes.py``, their drawing in ``drawing.py``; this module adds the captions,
their vocabulary and the held-out concepts, and is the toy world's front door: what those modules define for the
rest of the package (``world.Scene``, ``world.sample_scene``, ``world.render``, ``world.CLASSES`` ...) is
importable from here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

# The ``X as X`` imports are only re-exported: the rest of the package reads them as ``world.X``.
from .drawing import render
from .scenes import ATTRIBUTES as ATTRIBUTES
from .scenes import CLASSES as CLASSES
from .scenes import COLOURS, DEFAULT_DROPOUT, HELD_OUT_SHAPES, HELD_OUT_TEXTURES, CaptionDropout, Scene, sample_scene
from .scenes import HELD_OUT as HELD_OUT
from .scenes import IMAGE_SIZE as IMAGE_SIZE
from .scenes import SHAPES as SHAPES
from .scenes import SIZES as SIZES
from .scenes import TEXTURES as TEXTURES

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
