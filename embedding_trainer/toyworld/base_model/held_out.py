"""The held-out words: the finished model's text encoder forgets them (their token rows go back to their initial
random values), so the UNet can draw a heart but no word asks for one (see embedding_trainer/toyworld/README.md)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import world
from .architecture import build_text_encoder
from .plan import Architecture, BaseModelError


def held_out_token_ids(tokenizer: Any, words: Sequence[str] | None = None) -> dict[str, int]:
    """The token id of each held-out word (default: ``world.held_out_words()``); each must be one CLIP token that no
    other caption word uses."""
    ids = {}
    for word in world.held_out_words() if words is None else words:
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise BaseModelError(f"held-out word {word!r} is {len(tokens)} CLIP tokens; held-out words must be one")
        ids[word] = tokens[0]
    others = set(world.caption_vocabulary()) - set(ids)
    shared = set(ids.values()) & {t for w in others for t in tokenizer(w, add_special_tokens=False)["input_ids"]}
    if shared:
        raise BaseModelError(f"held-out token ids {sorted(shared)} are also used by other caption words")
    return ids


@torch.no_grad()
def erase_held_out_words(
    text_encoder: Any, tokenizer: Any, initial_encoder: Any, words: Sequence[str] | None = None
) -> dict[str, int]:
    """Put the held-out words' token rows of ``text_encoder`` back to ``initial_encoder``'s (the same architecture
    and seed before training): they become like the ~49k tokens the captions never used, and the model keeps what it
    learnt to draw but loses the words for it. ``words``: other words than the shipped held-out ones (the learning
    benchmark erases one more per concept). Returns the erased ids."""
    ids = held_out_token_ids(tokenizer, words)
    rows = torch.tensor(sorted(ids.values()))
    table = text_encoder.get_input_embeddings().weight
    table[rows] = initial_encoder.get_input_embeddings().weight[rows].to(table)
    return ids


def initial_text_encoder(folder: str | Path) -> Any:
    """The text encoder of a saved model's plan before training (its held-out rows are these rows)."""
    record = json.loads((Path(folder) / "training_record.json").read_text(encoding="utf-8"))
    arch = {k: tuple(v) if isinstance(v, list) else v for k, v in record["plan"]["arch"].items()}
    return build_text_encoder(Architecture(**arch), int(record["plan"]["seed"]))
