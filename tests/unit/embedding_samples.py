"""Sample embeddings and model shapes shared by the embedding-file tests."""

from __future__ import annotations

from pathlib import Path

import torch

from embedding_trainer.embedding_file import EmbeddingData
from embedding_trainer.host import EncoderInfo

SD1 = (EncoderInfo("clip_l", 768),)
SD2 = (EncoderInfo("clip_h", 1024),)
SDXL = (EncoderInfo("clip_l", 768), EncoderInfo("clip_g", 1280))
SHAPES = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}


def make_data(family: str, n: int = 3, name: str = "mytoken", seed: int = 0) -> EmbeddingData:
    g = torch.Generator().manual_seed(seed)
    vectors = {e.key: torch.randn(n, e.width, generator=g) for e in SHAPES[family]}
    meta = {
        "base_model_name": "model-x",
        "base_model_hash": "0123456789ab",
        "family": family,
        "settings": '{"lr": 0.005}',
    }
    return EmbeddingData(name=name, vectors=vectors, step=1234, metadata=meta)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())
