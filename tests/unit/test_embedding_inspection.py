"""Inspecting and converting embedding files (the CLI's ``inspect`` and ``convert``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from embedding_trainer.embedding_file import EmbeddingData, file_sha256, save_embedding
from embedding_trainer.embedding_inspection import convert_embedding, format_inspection, inspect_embedding
from embedding_trainer.embedding_reading import load_embedding
from embedding_trainer.errors import EmbeddingFileError
from tests.unit.embedding_samples import SD1, SDXL, make_data

# ---------------------------------------------------------------------------------------------------------------
# Convert and inspect


def test_convert_round_trip_keeps_everything(tmp_path: Path) -> None:
    data = make_data("sd1")
    src = save_embedding(data, tmp_path / "src.safetensors")
    mid = convert_embedding(src, tmp_path / "mid.pt")
    back = convert_embedding(mid, tmp_path / "back.safetensors")
    for p in (mid, back):
        loaded = load_embedding(p, SD1)
        assert torch.equal(loaded.vectors["clip_l"], data.vectors["clip_l"])
        assert (loaded.name, loaded.step, loaded.metadata) == ("mytoken", 1234, data.metadata)
    with pytest.raises(EmbeddingFileError, match="already exists"):
        convert_embedding(src, back)
    with pytest.raises(EmbeddingFileError, match="suffix"):
        convert_embedding(src, tmp_path / "out.jpg")


def test_convert_foreign_and_sdxl(tmp_path: Path) -> None:
    t = torch.randn(2, 768)
    torch.save({"<tok>": t}, tmp_path / "foreign.bin")
    out = convert_embedding(tmp_path / "foreign.bin", tmp_path / "foreign.safetensors")
    assert safetensors.torch.load_file(str(out)).keys() == {"emb_params"}
    assert torch.equal(load_embedding(out).vectors["vec"], t)

    xl = make_data("sdxl", name="xl")
    src = save_embedding(xl, tmp_path / "xl.safetensors")
    pt = convert_embedding(src, tmp_path / "xl.pt")
    loaded = load_embedding(pt, SDXL)
    assert all(torch.equal(loaded.vectors[k], xl.vectors[k]) for k in ("clip_l", "clip_g"))


def test_inspect_reports_norms_hash_and_metadata(tmp_path: Path) -> None:
    vec = torch.zeros(2, 768)
    vec[0, :2] = torch.tensor([3.0, 4.0])
    vec[1, 0] = 0.5
    data = EmbeddingData("insp", {"clip_l": vec}, step=42, metadata={"base_model_name": "m"})
    path = save_embedding(data, tmp_path / "insp.safetensors")
    info = inspect_embedding(path)
    assert info["layout"] == "emb_params" and info["container"] == "safetensors"
    assert (info["name"], info["step"], info["num_vectors"]) == ("insp", 42, 2)
    assert info["encoders"]["vec"]["width"] == 768
    assert info["encoders"]["vec"]["norms"] == pytest.approx([5.0, 0.5])
    assert info["metadata"] == {"base_model_name": "m"}
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path)
    assert info["size_bytes"] == os.path.getsize(path)

    text = format_inspection(info)
    assert "layout:      emb_params (safetensors)" in text
    assert "name:        insp" in text
    assert "width 768 (SD1" in text
    assert "L2 norms: 5, 0.5" in text
    assert info["sha256"][:10] in text
    assert "base_model_name: m" in text


@pytest.mark.parametrize("keys", [("clip_l",), ("clip_l", "clip_g")])
def test_inspect_recognises_the_trainers_own_run_states(tmp_path: Path, capsys: pytest.CaptureFixture[str], keys):
    import json

    from embedding_trainer.run_state import save_state
    from embedding_trainer.standalone import cli

    leaves = {key: torch.randn(2, 32 if key == "clip_l" else 48, requires_grad=True) for key in keys}
    optimizer = torch.optim.AdamW(list(leaves.values()))
    for leaf in leaves.values():
        leaf.grad = torch.ones_like(leaf)
    optimizer.step()
    path = tmp_path / "saves" / "my-cat-000004.state.safetensors"
    path.parent.mkdir()
    save_state(path, leaves, optimizer, None, 4, 10, json.dumps({"name": "my-cat"}))
    info = inspect_embedding(path)
    assert (info["layout"], info["name"], info["step"], info["num_vectors"]) == ("embtrain_run_state", "my-cat", 14, 2)
    assert set(info["encoders"]) == ({"vec"} if len(keys) == 1 else {"clip_l", "clip_g"})
    assert cli.main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "resumable run state" in text and f"--resume {path}" in text and "my-cat-000004.safetensors" in text
