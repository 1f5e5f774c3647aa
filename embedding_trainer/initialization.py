"""Initial values of the trainable vectors: from a text, from an existing embedding file, or random."""

from __future__ import annotations

import torch

from .errors import ConfigError
from .host import Host


def vectors_from_text(host: Host, text: str, num_vectors: int) -> dict[str, torch.Tensor]:
    """Spread the text's token embeddings over ``num_vectors`` (vector i is token ``i * k // n``), as the WebUI does.

    A text with more tokens than vectors keeps an even selection of them; fewer tokens are repeated.
    """
    result = {}
    for encoder in host.encoders:
        rows = host.token_embeddings(encoder.key, text)
        if rows.shape[0] == 0:
            raise ConfigError("init_text", f"{text!r} has no tokens; give a word close to the concept, e.g. 'cat'")
        index = [i * rows.shape[0] // num_vectors for i in range(num_vectors)]
        result[encoder.key] = rows[index].to(torch.float32).clone()
    return result


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
