"""Embedding files: round trips, every readable layout, safety of pickle loading, errors and atomic writes."""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from embedding_trainer import embedding_file as ef
from embedding_trainer.embedding_file import (
    EmbeddingData,
    convert_embedding,
    file_sha256,
    format_inspection,
    inspect_embedding,
    load_embedding,
    save_embedding,
)
from embedding_trainer.errors import EmbeddingFileError
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
# Layouts written by other tools


def test_reads_a1111_pt_zip_format(tmp_path: Path) -> None:
    t = torch.randn(2, 768)
    path = tmp_path / "webui.pt"
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": t.clone().requires_grad_(True)},
            "name": "stored-name",
            "step": 500,
            "sd_checkpoint": "abcdef1234",
            "sd_checkpoint_name": "v1-5-pruned",
        },
        path,
    )
    data = load_embedding(path, SD1)
    assert data.layout == "a1111_pt"
    assert data.name == "stored-name" and data.step == 500
    assert data.metadata == {"base_model_hash": "abcdef1234", "base_model_name": "v1-5-pruned"}
    assert torch.equal(data.vectors["clip_l"], t) and not data.vectors["clip_l"].requires_grad


def test_reads_a1111_pt_with_none_step(tmp_path: Path) -> None:
    path = tmp_path / "nostep.pt"
    torch.save({"string_to_param": {"*": torch.ones(1, 8)}, "step": None, "sd_checkpoint": None}, path)
    data = load_embedding(path)
    assert data.step == 0 and data.name == "nostep" and data.metadata == {}


@pytest.mark.skipif(not hasattr(torch.serialization, "safe_globals"), reason="needs torch >= 2.5")
def test_reads_parameter_dict_from_original_repo(tmp_path: Path) -> None:
    t = torch.randn(1, 768)
    path = tmp_path / "old.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": torch.nn.ParameterDict({"*": t})}, path)
    data = load_embedding(path)
    assert torch.equal(data.vectors["vec"], t)
    assert torch.nn.ParameterDict not in torch.serialization.get_safe_globals()  # allowed only while loading


def test_reads_diffusers_bin_and_safetensors(tmp_path: Path) -> None:
    t = torch.randn(2, 1024)
    torch.save({"<cat-toy>": t}, tmp_path / "learned_embeds.bin")
    safetensors.torch.save_file({"<cat-toy>": t}, str(tmp_path / "learned_embeds.safetensors"))
    for name in ("learned_embeds.bin", "learned_embeds.safetensors"):
        data = load_embedding(tmp_path / name, SD2)
        assert data.layout == "single_key"
        assert data.name == "learned_embeds" and data.step == 0
        assert torch.equal(data.vectors["clip_h"], t)


def test_reads_one_dimensional_vector(tmp_path: Path) -> None:
    t = torch.arange(768, dtype=torch.float32)
    torch.save({"<tok>": t}, tmp_path / "one.bin")
    data = load_embedding(tmp_path / "one.bin", SD1)
    assert data.vectors["clip_l"].shape == (1, 768)
    assert torch.equal(data.vectors["clip_l"][0], t)


@pytest.mark.parametrize("key", ["emb_params", "emp_params"])
def test_reads_kohya_and_onetrainer_keys(tmp_path: Path, key: str) -> None:
    t = torch.randn(4, 768).half()
    safetensors.torch.save_file({key: t}, str(tmp_path / "k.safetensors"))
    data = load_embedding(tmp_path / "k.safetensors", SD1)
    assert data.layout == key
    assert data.name == "k" and data.step == 0 and data.metadata == {}
    assert data.vectors["clip_l"].dtype == torch.float32
    assert torch.equal(data.vectors["clip_l"], t.float())


def test_reads_sdxl_dict_in_safetensors_and_pt(tmp_path: Path) -> None:
    l_, g = torch.randn(2, 768), torch.randn(2, 1280)
    safetensors.torch.save_file({"clip_g": g, "clip_l": l_}, str(tmp_path / "xl.safetensors"))
    # Some tools put a name/step next to the tensors; we tolerate plain values there.
    torch.save({"clip_l": l_, "clip_g": g, "name": "xl-name", "step": 9}, tmp_path / "xl.pt")
    a = load_embedding(tmp_path / "xl.safetensors", SDXL)
    b = load_embedding(tmp_path / "xl.pt", SDXL)
    for data in (a, b):
        assert data.layout == "sdxl_dict"
        assert torch.equal(data.vectors["clip_l"], l_) and torch.equal(data.vectors["clip_g"], g)
    assert a.name == "xl" and b.name == "xl-name" and b.step == 9
    assert list(load_embedding(tmp_path / "xl.safetensors").vectors) == ["clip_l", "clip_g"]


# ---------------------------------------------------------------------------------------------------------------
# Pickle safety


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # runs at unpickling time with a plain pickle.load / torch.load(weights_only=False)
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("nested", [False, True])
def test_malicious_pickle_is_refused_and_not_run(tmp_path: Path, nested: bool) -> None:
    marker = tmp_path / "PWNED"
    payload = _Exploit(marker)
    obj = {"string_to_param": {"*": payload}} if nested else {"<tok>": torch.ones(1, 4), "x": payload}
    path = tmp_path / "evil.pt"
    torch.save(obj, path)
    with pytest.raises(EmbeddingFileError) as err:
        load_embedding(path)
    msg = str(err.value)
    assert "refusing to execute pickled code" in msg
    assert str(path) in msg and "convert" in msg
    assert not marker.exists()


def test_exploit_really_runs_without_protection(tmp_path: Path) -> None:
    # Proves the test above could fail: the payload is live.
    marker = tmp_path / "PWNED"
    buf = io.BytesIO()
    torch.save({"x": _Exploit(marker)}, buf)
    buf.seek(0)
    torch.load(buf, weights_only=False)
    assert marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# Model mismatches


def test_width_mismatch_names_file_widths_and_families(tmp_path: Path) -> None:
    path = save_embedding(make_data("sd1"), tmp_path / "sd1.safetensors")
    with pytest.raises(EmbeddingFileError) as err:
        load_embedding(path, SD2)
    msg = str(err.value)
    assert str(path) in msg
    assert "768" in msg and "1024" in msg and "SD1" in msg and "SD2" in msg and "clip_h" in msg


def test_sdxl_clip_g_width_mismatch(tmp_path: Path) -> None:
    safetensors.torch.save_file(
        {"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1024)}, str(tmp_path / "bad.safetensors")
    )
    with pytest.raises(EmbeddingFileError, match=r"clip_g has width 1024 \(SD2.*expects width 1280 \(SDXL's clip_g"):
        load_embedding(tmp_path / "bad.safetensors", SDXL)


def test_single_embedding_on_sdxl_model(tmp_path: Path) -> None:
    path = save_embedding(make_data("sd1"), tmp_path / "sd1.pt")
    with pytest.raises(EmbeddingFileError) as err:
        load_embedding(path, SDXL)
    msg = str(err.value)
    assert "single-encoder SD1/SD2 embedding (width 768" in msg and "SDXL needs clip_l and clip_g" in msg
    assert str(path) in msg


def test_sdxl_embedding_on_single_encoder_model(tmp_path: Path) -> None:
    path = save_embedding(make_data("sdxl"), tmp_path / "xl.safetensors")
    with pytest.raises(
        EmbeddingFileError, match="this is an SDXL embedding .*single text encoder \\(clip_l, width 768"
    ):
        load_embedding(path, SD1)


# ---------------------------------------------------------------------------------------------------------------
# Files that are not embeddings


def _write(path: Path, obj: object) -> Path:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(obj, str(path))  # type: ignore[arg-type]
    else:
        torch.save(obj, path)
    return path


BAD_FILES = {
    "two_tensors.safetensors": ({"a": torch.ones(1, 8), "b": torch.ones(1, 8)}, "holds 2 tensors"),
    "no_tensors.pt": ({"name": "x"}, "holds no tensors"),
    "three_d.safetensors": ({"emb_params": torch.ones(1, 2, 8)}, "shape [1, 2, 8]"),
    "nan.safetensors": ({"emb_params": torch.tensor([[1.0, float("nan")]])}, "NaN or infinite"),
    "inf.pt": ({"string_to_param": {"*": torch.tensor([[float("inf"), 1.0]])}}, "NaN or infinite"),
    "ints.safetensors": ({"emb_params": torch.ones(1, 8, dtype=torch.int64)}, "dtype torch.int64"),
    "two_terms.pt": ({"string_to_param": {"*": torch.ones(1, 8), "+": torch.ones(1, 8)}}, "exactly one tensor"),
    "sdxl_extra.safetensors": (
        {"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280), "x": torch.ones(1)},
        "also has 'x'",
    ),
    "sdxl_counts.safetensors": ({"clip_l": torch.ones(1, 768), "clip_g": torch.ones(2, 1280)}, "same count"),
    "a_list.pt": ([torch.ones(1, 8)], "holds a list"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_not_an_embedding(tmp_path: Path, name: str) -> None:
    obj, expected = BAD_FILES[name]
    path = _write(tmp_path / name, obj)
    with pytest.raises(EmbeddingFileError) as err:
        load_embedding(path)
    msg = str(err.value)
    assert str(path) in msg
    assert expected in msg


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("garbage.pt", b"\x80\x02this is not a pickle at all", "corrupt or not a torch file"),
        ("random.bin", bytes(range(256)) * 4, "corrupt or not a torch file"),
        ("empty.pt", b"", "corrupt or not a torch file"),
        ("garbage.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", "not a readable safetensors file"),
        ("notes.txt", b"hello", "unknown suffix '.txt'"),
    ],
)
def test_corrupt_or_unknown_files_list_layouts(tmp_path: Path, name: str, content: bytes, expected: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(EmbeddingFileError) as err:
        load_embedding(path)
    msg = str(err.value)
    assert str(path) in msg and expected in msg
    assert "understood layouts" in msg


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = save_embedding(make_data("sd1"), tmp_path / "t.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(EmbeddingFileError, match="not a readable safetensors file"):
        load_embedding(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingFileError, match=r"missing\.pt: file not found"):
        load_embedding(tmp_path / "missing.pt")


# ---------------------------------------------------------------------------------------------------------------
# Writing: overwrite protection, atomicity, validation


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


def test_file_appearing_during_write_is_not_replaced(tmp_path: Path) -> None:
    # The final placement itself refuses, not just the early exists() check.
    path = tmp_path / "race.pt"
    path.write_bytes(b"theirs")
    with pytest.raises(EmbeddingFileError, match="already exists"):
        ef.write_atomically(path, lambda f: f.write(b"ours"), overwrite=False)
    assert path.read_bytes() == b"theirs"
    assert listing(tmp_path) == ["race.pt"]


def test_creates_parent_folders(tmp_path: Path) -> None:
    path = save_embedding(make_data("sd1"), tmp_path / "a" / "b" / "c.pt")
    assert path.is_file() and listing(path.parent) == ["c.pt"]


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

    monkeypatch.setattr(ef.os, "fsync", fail_fsync)
    with pytest.raises(OSError, match="fsync failed"):
        save_embedding(make_data("sd1", seed=2), path, overwrite=True)
    assert path.read_bytes() == original
    assert listing(tmp_path) == ["keep.pt"]


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


def test_the_same_embedding_saved_twice_has_the_same_hash_and_normal_permissions(tmp_path: Path) -> None:
    # The WebUI's TI hashes come from the file's sha256; safetensors alone orders header metadata at random.
    data = EmbeddingData("x", {"clip_l": torch.ones(2, 8)}, step=3, metadata={f"k{i}": str(i) for i in range(12)})
    a = save_embedding(data, tmp_path / "a.safetensors")
    b = save_embedding(data, tmp_path / "b.safetensors")
    assert ef.file_sha256(a) == ef.file_sha256(b)
    assert load_embedding(a).metadata == data.metadata and torch.equal(
        load_embedding(a).vectors["vec"], torch.ones(2, 8)
    )
    mask = os.umask(0)
    os.umask(mask)
    assert a.stat().st_mode & 0o777 == 0o666 & ~mask


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
    info = ef.inspect_embedding(path)
    assert (info["layout"], info["name"], info["step"], info["num_vectors"]) == ("embtrain_run_state", "my-cat", 14, 2)
    assert set(info["encoders"]) == ({"vec"} if len(keys) == 1 else {"clip_l", "clip_g"})
    assert cli.main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "resumable run state" in text and f"--resume {path}" in text and "my-cat-000004.safetensors" in text


def test_a_onetrainer_output_embedding_and_an_old_format_parameter_dict_are_named_for_what_they_are(tmp_path: Path):
    sdxl = {
        "clip_l": torch.zeros(2, 768),
        "clip_g": torch.zeros(2, 1280),
        "clip_l_out": torch.randn(2, 768),
        "clip_g_out": torch.randn(2, 1280),
    }
    safetensors.torch.save_file(sdxl, str(tmp_path / "ot.safetensors"))
    with pytest.raises(EmbeddingFileError, match="OneTrainer embedding saved with its output-embedding option"):
        ef.load_embedding(tmp_path / "ot.safetensors")
    # The original textual-inversion code's nn.ParameterDict in torch's pre-1.6 format: not malicious, just old.
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(2, 768))})
    old = tmp_path / "old.pt"
    torch.save({"string_to_param": params, "name": "old"}, old, _use_new_zipfile_serialization=False)
    with pytest.raises(EmbeddingFileError) as error:
        ef.load_embedding(old)
    assert "old-format torch file" in str(error.value) and "arbitrary code" not in str(error.value)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_picture_card_round_trips_through_its_text_chunk_and_through_its_data_bands_alone(tmp_path: Path, family):
    from PIL import Image

    data = make_data(family, seed=3)
    picture = Image.new("RGB", (96, 64), (10, 200, 30))
    path = ef.save_embedding(data, tmp_path / "my-cat.png", picture=picture)
    read = ef.load_embedding(path)
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
    again = ef.load_embedding(stripped)
    assert all(torch.equal(again.vectors[k], read.vectors[k]) for k in read.vectors)
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "plain.png")
    with pytest.raises(EmbeddingFileError, match="a picture without an embedding in it"):
        ef.load_embedding(tmp_path / "plain.png")
