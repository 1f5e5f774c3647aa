"""What the split WebUI-exporter tests (tests/unit/test_export_a1111_*.py) share: the tiny models they export, each
made once per test module by the module's own fixture. Not a test module."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from embedding_trainer.tools.export_a1111 import export_a1111


def export_tiny_sd1(tiny_model_dirs: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """The tiny SD1 model (``tiny_model_dirs("sd1")``) and its export (its GroupNorms use 8 groups, so the mismatch
    must be allowed)."""
    model = tiny_model_dirs("sd1")
    out = tmp_path_factory.mktemp("export") / "tiny"
    return model, export_a1111(model, out, allow_norm_group_mismatch=True)


def loadable_exports(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Any]]:
    """``get(family)`` -> (diffusers folder, ExportResult) of the WebUI-loadable tiny model, made on first use."""
    from embedding_trainer.tools.tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("loadable")
    made: dict[str, tuple[Path, Any]] = {}

    def get(family: str) -> tuple[Path, Any]:
        if family not in made:
            folder = save_tiny_model(family, root / family, seed=0, webui_loadable=True)
            made[family] = folder, export_a1111(folder, root / "out" / f"tiny-{family}")
        return made[family]

    return get
