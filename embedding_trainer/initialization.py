"""Initial values of the trainable vectors, and the scale of the token-embedding table they live in.

Vectors come from a text (its token embeddings, or the text encoder's output for it), from an existing embedding
file, or at random; ``init_candidates`` lists the words that ``init_mode best-word`` ranks by their loss on the
user's images.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable

import torch

from .errors import ConfigError
from .host import Host

#: The per-coordinate scale of SD1's CLIP ViT-L token table: its rows' lengths sit near 0.4 (reported; see
#: ``shared/reference``) over 768 coordinates. ``lr_scale table`` measures learning rates in this unit, so the
#: rates users know from SD1 keep their meaning there and mean the same relative step on any other table.
SD1_TABLE_SCALE = 0.4 / math.sqrt(768)

#: Words ``init_mode best-word`` always tries besides the init text and the captions' words: common subjects,
#: shapes, materials and styles a concept is likely to sit near.
BUILT_IN_INIT_WORDS = (
    "*",
    "person",
    "man",
    "woman",
    "face",
    "child",
    "cat",
    "dog",
    "bird",
    "animal",
    "toy",
    "doll",
    "car",
    "house",
    "building",
    "tree",
    "flower",
    "plant",
    "food",
    "cup",
    "bottle",
    "chair",
    "shoe",
    "hat",
    "shirt",
    "dress",
    "bag",
    "object",
    "thing",
    "shape",
    "symbol",
    "figure",
    "logo",
    "icon",
    "circle",
    "square",
    "triangle",
    "star",
    "heart",
    "cross",
    "pattern",
    "texture",
    "fabric",
    "metal",
    "wood",
    "stone",
    "glass",
    "colour",
    "color",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "pink",
    "black",
    "white",
    "grey",
    "brown",
    "background",
    "landscape",
    "sky",
    "water",
    "style",
    "painting",
    "drawing",
    "sketch",
    "photo",
    "illustration",
    "cartoon",
    "art",
)
#: Caption words that say nothing about a concept.
_STOP_WORDS = frozenset(
    "a an the of in on at to and or with without for from by is are this that it its photo picture image "
    "background".split()
)
#: How many of the captions' most frequent words ``best-word`` tries.
CAPTION_WORDS = 24


def vectors_from_text(host: Host, text: str, num_vectors: int) -> dict[str, torch.Tensor]:
    """Spread the text's token embeddings over ``num_vectors`` (vector i is token ``i * k // n``), as the WebUI does.

    A text with more tokens than vectors keeps an even selection of them; fewer tokens are repeated.
    """
    return {e.key: _spread(host.token_embeddings(e.key, text), num_vectors, text) for e in host.encoders}


def vectors_from_encoder_output(host: Host, text: str, num_vectors: int) -> dict[str, torch.Tensor]:
    """CrossInit: the text encoder's output for ``text`` (the hidden states the UNet reads at its tokens), spread
    over the vectors like ``vectors_from_text``. Output vectors are the kind of input a trained embedding drifts to,
    so training starts nearer its end."""
    return {e.key: _spread(host.encoder_output(e.key, text), num_vectors, text) for e in host.encoders}


def _spread(rows: torch.Tensor, num_vectors: int, text: str) -> torch.Tensor:
    if rows.shape[0] == 0:
        raise ConfigError("init_text", f"{text!r} has no tokens; give a word close to the concept, e.g. 'cat'")
    index = [i * rows.shape[0] // num_vectors for i in range(num_vectors)]
    return rows[index].to("cpu", torch.float32).clone()


def random_vectors(host: Host, num_vectors: int, seed: int) -> dict[str, torch.Tensor]:
    """Draw each dimension from a normal with the vocabulary's per-dimension mean and spread."""
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for encoder in host.encoders:
        vocab = host.vocabulary(encoder.key).detach().to("cpu", torch.float32)
        mean, std = vocab.mean(dim=0), vocab.std(dim=0)
        noise = torch.randn(num_vectors, encoder.width, generator=generator)
        result[encoder.key] = (mean + std * noise).contiguous()
    return result


def table_scale(host: Host, encoder_key: str) -> float:
    """A typical coordinate's size in the token table: the median row length over the square root of the width
    (in chunks: SDXL's fp16 table on a GPU is 120 MiB)."""
    table = host.vocabulary(encoder_key).detach()
    norms = torch.cat([chunk.float().norm(dim=1) for chunk in table.split(8192)])
    return float(norms.median()) / math.sqrt(table.shape[-1])


def prompt_word_norm(host: Host, encoder_key: str, texts: Iterable[str]) -> float:
    """The median length of the token rows of ``texts`` (the words a run's prompts use)."""
    rows = [host.token_embeddings(encoder_key, text) for text in texts]
    rows = [r for r in rows if r.shape[0]]
    if not rows:
        raise ConfigError("norm_band", "the template and captions have no words to measure a typical length from")
    return float(torch.cat(rows).norm(dim=1).median())


def init_candidates(init_text: str, captions: Iterable[str], trigger: str) -> list[str]:
    """The texts ``best-word`` ranks, in order, without repeats: the init text and each of its words, the captions'
    most frequent words, then ``BUILT_IN_INIT_WORDS``. The trigger word is never a candidate."""
    counts = Counter(
        word
        for text in captions
        for word in re.findall(r"[a-z]+(?:['-][a-z]+)*", text.lower())
        if word not in _STOP_WORDS and len(word) > 1
    )
    own = [init_text.strip(), *re.findall(r"[^\s,]+", init_text)]
    ordered = [*own, *(w for w, _ in counts.most_common(CAPTION_WORDS)), *BUILT_IN_INIT_WORDS]
    seen: set[str] = set()
    result = []
    for text in ordered:
        key = text.lower()
        if text and key not in seen and key != trigger.lower():
            seen.add(key)
            result.append(text)
    return result
