"""Shared fixtures: tiny random-weight models (built once per session) and generated image folders. Plain helper
functions live in ``tests/helpers.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import make_images

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test models are tiny: one thread is as fast, and far faster when other processes keep the cores busy."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_model_dirs(family)`` -> a diffusers-format folder of a tiny model (seed 0), written once."""
    from embedding_trainer.tools.tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = save_tiny_model(family, root / family, seed=0)
        return made[family]

    return get


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    make_images(tmp_path / "images")
    return tmp_path / "images"
