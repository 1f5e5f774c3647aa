"""Atomic writes: a file that exists is never replaced unasked, and a failed write leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedding_trainer import atomic_write
from embedding_trainer import embedding_file as ef
from embedding_trainer.atomic_write import write_atomically
from embedding_trainer.embedding_file import save_embedding
from embedding_trainer.errors import EmbeddingFileError
from tests.unit.embedding_samples import listing, make_data


def test_file_appearing_during_write_is_not_replaced(tmp_path: Path) -> None:
    # The final placement itself refuses, not just the early exists() check.
    path = tmp_path / "race.pt"
    path.write_bytes(b"theirs")
    with pytest.raises(EmbeddingFileError, match="already exists"):
        write_atomically(path, lambda f: f.write(b"ours"), overwrite=False)
    assert path.read_bytes() == b"theirs"
    assert listing(tmp_path) == ["race.pt"]


@pytest.mark.parametrize(("suffix", "writer"), [(".safetensors", "_write_safetensors"), (".pt", "_write_pt")])
def test_failed_write_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str, writer: str
) -> None:
    real = getattr(ef, writer)

    def half_then_fail(f, *args):  # type: ignore[no-untyped-def]
        real(f, *args)
        raise OSError("disk full")

    monkeypatch.setattr(ef, writer, half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_embedding(make_data("sd1"), tmp_path / f"x{suffix}")
    assert listing(tmp_path) == []


def test_failed_overwrite_keeps_original(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_embedding(make_data("sd1", seed=1), tmp_path / "keep.pt")
    original = path.read_bytes()

    def fail_fsync(fd: int) -> None:
        raise OSError("fsync failed")

    monkeypatch.setattr(atomic_write.os, "fsync", fail_fsync)
    with pytest.raises(OSError, match="fsync failed"):
        save_embedding(make_data("sd1", seed=2), path, overwrite=True)
    assert path.read_bytes() == original
    assert listing(tmp_path) == ["keep.pt"]
