"""Textual-inversion embedding files: the embedding in memory, the layouts, and writing them.

Writes two layouts that every common host loads:

* ``.safetensors``: one encoder -> ``{"emb_params": [n, d]}``; SDXL -> ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``.
  Name, step and free-form metadata go into the header (hosts ignore it; our tools read it back).
* ``.pt``: the WebUI's own dict (``string_to_param`` etc.) for one encoder, ``{"clip_l", "clip_g"}`` for SDXL, in
  torch's legacy (non-zip) pickle format, because A1111 v1.10.1's safe unpickler rejects the zip archives that
  recent torch versions write.

Reading lives in ``embedding_reading.py``, inspecting and converting in ``embedding_inspection.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import safetensors.torch
import torch

from .atomic_write import already_exists_error, write_atomically
from .embedding_card import card_bytes
from .errors import EmbeddingFileError
from .log import logger

FORMAT_VERSION = "1"
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".bin")
SDXL_KEYS = ("clip_l", "clip_g")
#: Key of the one tensor of a single-encoder file read without knowing the model.
SINGLE_KEY = "vec"

# Layout names (EmbeddingData.layout, inspect output).
LAYOUT_A1111 = "a1111_pt"
LAYOUT_EMB_PARAMS = "emb_params"
LAYOUT_EMP_PARAMS = "emp_params"
LAYOUT_SINGLE_KEY = "single_key"
LAYOUT_SDXL = "sdxl_dict"
#: The WebUI's picture card (``embedding_card.py``) holding its ``.pt`` dict.
LAYOUT_CARD = "webui_card"
#: This trainer's resumable run state (``run_state.py``): the vectors of a step beside the optimiser's moments.
LAYOUT_RUN_STATE = "embtrain_run_state"

# Header keys we own; everything else in a safetensors header is user metadata.
RESERVED_HEADER_KEYS = ("name", "step", "num_vectors", "embtrain_format")
# Extra keys in our single-encoder .pt dict; hosts read the dict with .get() and ignore unknown keys.
PT_FORMAT_KEY = "embtrain_format"
PT_METADATA_KEY = "embtrain_metadata"

_WIDTH_FAMILIES = {
    768: "SD1 / CLIP-L, also SDXL's clip_l",
    1024: "SD2 / OpenCLIP-H",
    1280: "SDXL's clip_g / OpenCLIP-bigG",
}


def width_family(width: int) -> str:
    """Which model family a token-embedding width belongs to (for error messages)."""
    return _WIDTH_FAMILIES.get(width, "no standard model family")


@dataclass
class EmbeddingData:
    """An embedding in memory: ``[n, width]`` float32 CPU vectors per text encoder, plus what describes them."""

    name: str
    vectors: dict[str, torch.Tensor]
    step: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    layout: str = ""

    @property
    def num_vectors(self) -> int:
        for t in self.vectors.values():
            return int(t.shape[0])
        return 0


# ---------------------------------------------------------------------------------------------------------------
# Writing


def save_embedding(
    data: EmbeddingData,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    layout: str | None = None,
    picture: Any = None,
) -> Path:
    """Write ``data`` atomically; the layout follows the suffix (``.safetensors``, ``.pt``, or ``.png``: the WebUI's
    picture card around ``picture``, a PIL image, else a plain tile) unless ``layout`` (``"safetensors"``, ``"pt"``
    or ``"card"``) is given. Refuses to replace an existing file unless ``overwrite``."""
    path = Path(path)
    container = container_for_write(path, layout)
    tensors = _tensors_for_write(data, path)
    if path.is_dir():
        raise EmbeddingFileError(f"{path}: is a folder; give a file name ending in .safetensors or .pt")
    if path.exists() and not overwrite:
        raise already_exists_error(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    if container == "safetensors":
        if len(tensors) == 1:
            tensors = {"emb_params": next(iter(tensors.values()))}
        header = {str(k): metadata_str(v) for k, v in data.metadata.items()}
        # Our own keys win over a metadata entry of the same name.
        header.update(
            name=data.name,
            step=str(int(data.step)),
            num_vectors=str(data.num_vectors),
            embtrain_format=FORMAT_VERSION,
        )
        write_atomically(path, lambda f: _write_safetensors(f, tensors, header), overwrite)
    else:
        obj = _webui_dict(data, tensors, path)
        if container == "card":
            card = card_bytes(obj, picture if picture is not None else _plain_picture(data.name))
            write_atomically(path, lambda f: f.write(card), overwrite)
        else:
            write_atomically(path, lambda f: _write_pt(f, obj), overwrite)
    logger.debug("saved embedding %s (%d vectors, step %d)", path, data.num_vectors, data.step)
    return path


def _webui_dict(data: EmbeddingData, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """The WebUI's own embedding object (what its ``.pt`` files and picture cards hold)."""
    if len(tensors) == 1:
        return {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": next(iter(tensors.values()))},
            "name": data.name,
            "step": int(data.step),
            "sd_checkpoint": data.metadata.get("base_model_hash") or None,
            "sd_checkpoint_name": data.metadata.get("base_model_name") or None,
            PT_FORMAT_KEY: FORMAT_VERSION,
            PT_METADATA_KEY: {str(k): metadata_str(v) for k, v in data.metadata.items()},
        }
    # The WebUI turns EVERY value of an SDXL dict into a float tensor, so a string such as the name would make it
    # reject the file: an SDXL .pt or card holds the two tensors only (the trigger is the file name).
    if data.step or data.metadata or data.name != path.stem:
        logger.warning(
            "%s: an SDXL %s can only hold the two tensors; the name, step and metadata are not stored (use "
            ".safetensors to keep them)",
            path,
            "card" if path.suffix.lower() == ".png" else ".pt file",
        )
    return dict(tensors)


def _plain_picture(name: str) -> Any:
    """A card's picture when none is given: the trigger on a neutral tile."""
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (256, 256), (236, 236, 236))
    ImageDraw.Draw(picture).text((16, 120), name, fill=(40, 40, 40))
    return picture


def _write_safetensors(f: IO[bytes], tensors: dict[str, torch.Tensor], header: dict[str, str]) -> None:
    # safetensors.torch.save returns the bytes, so the atomic writer controls the file (save_file would not).
    f.write(deterministic_safetensors(safetensors.torch.save(tensors, metadata=header)))


def deterministic_safetensors(payload: bytes) -> bytes:
    """The same file with its JSON header's keys sorted.

    safetensors writes header metadata in a random order, so the same embedding saved twice would get two sha256
    hashes, and the WebUI's ``TI hashes`` (and model hashes) come from the file's sha256. Sorting keeps the
    header's length, so the tensor offsets stay valid.
    """
    length = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + length])
    ordered = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    if len(ordered) > length:  # never expected: same content, compact form; keep the library's bytes
        return payload
    return payload[:8] + ordered.ljust(length, b" ") + payload[8 + length :]


def _write_pt(f: IO[bytes], obj: dict[str, Any]) -> None:
    # Legacy (non-zip) format: A1111 v1.10.1's check_pt refuses the zip entries newer torch adds.
    with quiet_typed_storage():
        torch.save(obj, f, _use_new_zipfile_serialization=False)


@contextlib.contextmanager
def quiet_typed_storage() -> Iterator[None]:
    """Silence torch's TypedStorage deprecation warning around legacy-format ``torch.save``/``torch.load``."""
    # torch 2.1's legacy-format reader and writer use TypedStorage and warn about its deprecation: not actionable.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
        yield


def container_for_write(path: Path, layout: str | None) -> str:
    """What :func:`save_embedding` writes to ``path``: ``layout`` when given, else the suffix decides."""
    if layout is not None:
        if layout not in ("safetensors", "pt", "card"):
            raise EmbeddingFileError(f"{path}: unknown layout {layout!r}; use 'safetensors', 'pt' or 'card'")
        return layout
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".pt":
        return "pt"
    if suffix == ".png":
        return "card"
    raise EmbeddingFileError(
        f"{path}: cannot tell the layout from the suffix {suffix or '(none)'!r}; "
        "name the file .safetensors (recommended), .pt or .png (a picture card)"
    )


def _tensors_for_write(data: EmbeddingData, path: Path) -> dict[str, torch.Tensor]:
    if not data.vectors:
        raise EmbeddingFileError(f"{path}: the embedding {data.name!r} has no vectors to save")
    if len(data.vectors) == 2 and set(data.vectors) != set(SDXL_KEYS):
        raise EmbeddingFileError(
            f"{path}: a two-encoder embedding must have the keys clip_l and clip_g, got {sorted(data.vectors)}"
        )
    if len(data.vectors) > 2:
        raise EmbeddingFileError(
            f"{path}: at most two encoders (clip_l, clip_g) are supported, got {sorted(data.vectors)}"
        )
    out: dict[str, torch.Tensor] = {}
    rows = None
    for key in SDXL_KEYS if len(data.vectors) == 2 else tuple(data.vectors):
        t = data.vectors[key]
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise EmbeddingFileError(f"{path}: vectors {key!r} must be a [n, width] tensor, got {shape}")
        # clone(): a view into a larger tensor would otherwise drag its whole storage into the file.
        t = t.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
        if not bool(torch.isfinite(t).all()):
            raise EmbeddingFileError(
                f"{path}: refusing to save vectors {key!r} of {data.name!r}: they contain NaN or infinite values"
            )
        if rows is not None and t.shape[0] != rows:
            raise EmbeddingFileError(f"{path}: clip_l and clip_g must have the same number of vectors")
        rows = t.shape[0]
        out[key] = t
    return out


def metadata_str(value: Any) -> str:
    """A metadata value as stored in a header or our ``.pt`` dict."""
    # Headers hold strings only; anything else is stored as JSON so it can be parsed back.
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


# ---------------------------------------------------------------------------------------------------------------
# Hashing


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of the file's bytes (the WebUI shows the first 10-12 characters as the embedding's hash)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
