"""Writing embedding files: round trips, the .pt and picture cards we write, overwrite protection and validation.

Reading other tools' layouts is tested in test_embedding_reading.py, atomic writes in test_atomic_write.py.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from embedding_trainer.embedding_file import EmbeddingData, file_sha256, save_embedding
from embedding_trainer.embedding_reading import load_embedding
from embedding_trainer.errors import EmbeddingFileError
from tests.unit.embedding_samples import SHAPES, listing, make_data

# ---------------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_is_bit_identical(tmp_path: Path, family: str, suffix: str) -> None:
    data = make_data(family)
    path = save_embedding(data, tmp_path / f"mytoken{suffix}")
    assert path == tmp_path / f"mytoken{suffix}"
    assert listing(tmp_path) == [f"mytoken{suffix}"]

    loaded = load_embedding(path, SHAPES[family])
    assert set(loaded.vectors) == set(data.vectors)
    for key, t in data.vectors.items():
        got = loaded.vectors[key]
        assert got.dtype == torch.float32 and got.device.type == "cpu" and got.is_contiguous()
        assert torch.equal(got, t)
    assert loaded.num_vectors == 3
    assert loaded.name == "mytoken"
    if family == "sdxl" and suffix == ".pt":
        # The WebUI rejects an SDXL dict with non-tensor values, so only the tensors are stored.
        assert loaded.step == 0 and loaded.metadata == {}
        assert loaded.layout == "sdxl_dict"
    else:
        assert loaded.step == 1234
        assert loaded.metadata == data.metadata
        expected_layout = {".safetensors": "emb_params", ".pt": "a1111_pt"}[suffix]
        assert loaded.layout == ("sdxl_dict" if family == "sdxl" else expected_layout)


def test_single_encoder_without_model_uses_key_vec(tmp_path: Path) -> None:
    data = make_data("sd2")
    path = save_embedding(data, tmp_path / "a.safetensors")
    loaded = load_embedding(path)
    assert list(loaded.vectors) == ["vec"]
    assert torch.equal(loaded.vectors["vec"], data.vectors["clip_h"])


def test_safetensors_keys_and_header(tmp_path: Path) -> None:
    path = save_embedding(make_data("sd1", n=2), tmp_path / "t.safetensors")
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["emb_params"]
        header = f.metadata()
    assert header["name"] == "mytoken"
    assert header["step"] == "1234"
    assert header["num_vectors"] == "2"
    assert header["embtrain_format"] == "1"
    assert header["base_model_hash"] == "0123456789ab"

    path = save_embedding(make_data("sdxl", n=2), tmp_path / "x.safetensors")
    tensors = safetensors.torch.load_file(str(path))
    assert sorted(tensors) == ["clip_g", "clip_l"]
    assert tensors["clip_l"].shape == (2, 768) and tensors["clip_g"].shape == (2, 1280)


def test_metadata_cannot_override_own_header_keys_and_non_strings_become_json(tmp_path: Path) -> None:
    data = EmbeddingData("real", {"clip_l": torch.ones(1, 8)}, step=5, metadata={"name": "fake", "epochs": 3})  # type: ignore[dict-item]
    loaded = load_embedding(save_embedding(data, tmp_path / "m.safetensors"))
    assert loaded.name == "real"
    assert loaded.metadata == {"epochs": "3"}


def test_view_of_larger_tensor_saves_only_the_view(tmp_path: Path) -> None:
    big = torch.randn(1000, 768)
    data = EmbeddingData("v", {"clip_l": big[2:4]})
    path = save_embedding(data, tmp_path / "v.pt")
    assert path.stat().st_size < 20_000  # 2 x 768 floats is 6 KB; the whole storage would be 3 MB
    assert torch.equal(load_embedding(path).vectors["vec"], big[2:4])


# ---------------------------------------------------------------------------------------------------------------
# The .pt we write


def test_pt_is_legacy_format_and_loads_weights_only(tmp_path: Path) -> None:
    data = make_data("sd1", n=2)
    path = save_embedding(data, tmp_path / "legacy.pt")
    assert not zipfile.is_zipfile(path)
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    assert obj["string_to_token"] == {"*": 265}
    assert list(obj["string_to_param"]) == ["*"]
    param = obj["string_to_param"]["*"]
    assert type(param) is torch.Tensor and not param.requires_grad
    assert torch.equal(param, data.vectors["clip_l"])
    assert obj["name"] == "mytoken" and obj["step"] == 1234
    assert obj["sd_checkpoint"] == "0123456789ab" and obj["sd_checkpoint_name"] == "model-x"

    sdxl = save_embedding(make_data("sdxl", n=2), tmp_path / "mytoken_xl.pt")
    assert not zipfile.is_zipfile(sdxl)
    obj = torch.load(str(sdxl), map_location="cpu", weights_only=True)
    assert sorted(obj) == ["clip_g", "clip_l"]  # every value must be a tensor for the WebUI


def test_pt_without_base_model_writes_none(tmp_path: Path) -> None:
    data = EmbeddingData("plain", {"clip_l": torch.zeros(1, 4)})
    obj = torch.load(str(save_embedding(data, tmp_path / "p.pt")), weights_only=True)
    assert obj["sd_checkpoint"] is None and obj["sd_checkpoint_name"] is None and obj["step"] == 0


# ---------------------------------------------------------------------------------------------------------------
# Writing: overwrite protection, validation, reproducible files


def test_overwrite_refused_keeps_original_bytes(tmp_path: Path) -> None:
    path = save_embedding(make_data("sd1", seed=1), tmp_path / "e.safetensors")
    original = path.read_bytes()
    with pytest.raises(EmbeddingFileError) as err:
        save_embedding(make_data("sd1", seed=2), path)
    assert str(path) in str(err.value) and "--overwrite" in str(err.value)
    assert path.read_bytes() == original
    assert listing(tmp_path) == ["e.safetensors"]

    save_embedding(make_data("sd1", seed=2), path, overwrite=True)
    assert path.read_bytes() != original
    assert torch.equal(load_embedding(path).vectors["vec"], make_data("sd1", seed=2).vectors["clip_l"])


def test_creates_parent_folders(tmp_path: Path) -> None:
    path = save_embedding(make_data("sd1"), tmp_path / "a" / "b" / "c.pt")
    assert path.is_file() and listing(path.parent) == ["c.pt"]


def test_save_refuses_nan_and_bad_input(tmp_path: Path) -> None:
    nan = EmbeddingData("n", {"clip_l": torch.tensor([[0.0, float("nan")]])})
    with pytest.raises(EmbeddingFileError, match="NaN or infinite"):
        save_embedding(nan, tmp_path / "n.safetensors")
    with pytest.raises(EmbeddingFileError, match=r"suffix '\.ckpt'"):
        save_embedding(make_data("sd1"), tmp_path / "n.ckpt")
    with pytest.raises(EmbeddingFileError, match="clip_l and clip_g"):
        save_embedding(EmbeddingData("k", {"a": torch.ones(1, 4), "b": torch.ones(1, 4)}), tmp_path / "k.pt")
    with pytest.raises(EmbeddingFileError, match="same number of vectors"):
        save_embedding(EmbeddingData("k", {"clip_l": torch.ones(1, 4), "clip_g": torch.ones(2, 4)}), tmp_path / "k.pt")
    with pytest.raises(EmbeddingFileError, match="no vectors"):
        save_embedding(EmbeddingData("k", {}), tmp_path / "k.pt")
    assert listing(tmp_path) == []


def test_explicit_layout_writes_pt_under_bin_suffix(tmp_path: Path) -> None:
    path = save_embedding(make_data("sd1"), tmp_path / "x.bin", layout="pt")
    assert not zipfile.is_zipfile(path)
    assert load_embedding(path).layout == "a1111_pt"


def test_the_same_embedding_saved_twice_has_the_same_hash_and_normal_permissions(tmp_path: Path) -> None:
    # The WebUI's TI hashes come from the file's sha256; safetensors alone orders header metadata at random.
    data = EmbeddingData("x", {"clip_l": torch.ones(2, 8)}, step=3, metadata={f"k{i}": str(i) for i in range(12)})
    a = save_embedding(data, tmp_path / "a.safetensors")
    b = save_embedding(data, tmp_path / "b.safetensors")
    assert file_sha256(a) == file_sha256(b)
    assert load_embedding(a).metadata == data.metadata and torch.equal(
        load_embedding(a).vectors["vec"], torch.ones(2, 8)
    )
    mask = os.umask(0)
    os.umask(mask)
    assert a.stat().st_mode & 0o777 == 0o666 & ~mask


# ---------------------------------------------------------------------------------------------------------------
# Picture cards


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_picture_card_round_trips_through_its_text_chunk_and_through_its_data_bands_alone(tmp_path: Path, family):
    from PIL import Image

    data = make_data(family, seed=3)
    picture = Image.new("RGB", (96, 64), (10, 200, 30))
    path = save_embedding(data, tmp_path / "my-cat.png", picture=picture)
    read = load_embedding(path)
    assert read.layout == ("webui_card" if family == "sd1" else "sdxl_dict")
    for key, vectors in data.vectors.items():
        assert torch.equal(read.vectors["vec" if family == "sd1" else key], vectors)
    if family == "sd1":
        assert (read.name, read.step) == (data.name, data.step)
    # The picture is in the middle, untouched; a copy without the text chunk (metadata stripped) still reads.
    with Image.open(path) as card:
        assert card.size[1] == 64 and card.text.get("sd-ti-embedding")
        pixels = card.convert("RGB")
        stripped = tmp_path / "stripped.png"
        pixels.save(stripped)  # no pnginfo: only the pixel bands carry the embedding now
    with Image.open(stripped) as copy:
        assert "sd-ti-embedding" not in getattr(copy, "text", {})
    again = load_embedding(stripped)
    assert all(torch.equal(again.vectors[k], read.vectors[k]) for k in read.vectors)
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "plain.png")
    with pytest.raises(EmbeddingFileError, match="a picture without an embedding in it"):
        load_embedding(tmp_path / "plain.png")
