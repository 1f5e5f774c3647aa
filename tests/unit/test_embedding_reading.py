"""Reading embedding files: every layout other tools write, safety of pickle loading, model mismatches, and files
that are not embeddings."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from embedding_trainer.embedding_file import save_embedding
from embedding_trainer.embedding_reading import load_embedding
from embedding_trainer.errors import EmbeddingFileError
from tests.unit.embedding_samples import SD1, SD2, SDXL, make_data

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


def test_a_onetrainer_output_embedding_and_an_old_format_parameter_dict_are_named_for_what_they_are(tmp_path: Path):
    sdxl = {
        "clip_l": torch.zeros(2, 768),
        "clip_g": torch.zeros(2, 1280),
        "clip_l_out": torch.randn(2, 768),
        "clip_g_out": torch.randn(2, 1280),
    }
    safetensors.torch.save_file(sdxl, str(tmp_path / "ot.safetensors"))
    with pytest.raises(EmbeddingFileError, match="OneTrainer embedding saved with its output-embedding option"):
        load_embedding(tmp_path / "ot.safetensors")
    # The original textual-inversion code's nn.ParameterDict in torch's pre-1.6 format: not malicious, just old.
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(2, 768))})
    old = tmp_path / "old.pt"
    torch.save({"string_to_param": params, "name": "old"}, old, _use_new_zipfile_serialization=False)
    with pytest.raises(EmbeddingFileError) as error:
        load_embedding(old)
    assert "old-format torch file" in str(error.value) and "arbitrary code" not in str(error.value)
