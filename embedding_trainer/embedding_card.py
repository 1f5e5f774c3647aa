"""The WebUI's embedding cards: a picture that carries an embedding, in a PNG text chunk and in pixel bands.

The layout, as the WebUI v1.10 reads it (facts, re-implemented here):

- text chunk ``sd-ti-embedding``: base64 of a JSON object (the ``.pt`` dict: ``string_to_param`` with one tensor,
  ``name``, ``step``, ...; or SDXL's ``clip_l``/``clip_g`` only), each tensor written as ``{"TORCHTENSOR": lists}``;
- data bands, for cards whose text chunk was stripped: the same JSON, zlib-compressed, its bytes split into low and
  high 4-bit halves, each half laid out as an ``[height, n, 3]`` block of pixels left and right of the picture with a
  black column between. Only the low 4 bits of a band pixel carry data, XORed with the low 4 bits of a fixed linear
  congruential sequence (seed 0, a=1664525, c=1013904223, mod 2**32, then mod 255); the high 4 bits are
  decoration. A reader drops the black border, keeps the low 4 bits, and splits at the first and last all-zero
  columns.
"""

from __future__ import annotations

import base64
import io
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from .errors import EmbeddingFileError

TEXT_KEY = "sd-ti-embedding"
CARD_SUFFIXES = (".png", ".webp")
_TENSOR_KEY = "TORCHTENSOR"
_CHANNELS = 3


def read_card(path: Path) -> dict[str, Any]:
    """The embedding dict a card carries (tensors as float32), from its text chunk or, failing that, its bands."""
    try:
        with Image.open(path) as image:
            image.load()
            text = getattr(image, "text", {}) or {}
            if TEXT_KEY in text:
                payload = base64.b64decode(text[TEXT_KEY])
            else:
                payload = _bands_payload(image)
    except EmbeddingFileError:
        raise
    except Exception as e:  # PIL's and zlib's own error types
        raise EmbeddingFileError(f"{path}: not a readable embedding card ({type(e).__name__}: {e})") from e
    if payload is None:
        raise EmbeddingFileError(
            f"{path}: a picture without an embedding in it (neither the WebUI's '{TEXT_KEY}' text nor its data "
            "bands); if it is a preview image, give the embedding file beside it"
        )
    try:
        data = json.loads(payload, object_hook=_tensor_from_json)
    except ValueError as e:
        raise EmbeddingFileError(f"{path}: the card's embedding data is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise EmbeddingFileError(f"{path}: the card holds a {type(data).__name__}, not an embedding object")
    return data


def card_bytes(data: dict[str, Any], picture: Image.Image) -> bytes:
    """A PNG card of ``data`` (the WebUI's dict layout, tensors as values) around ``picture``: text chunk and bands."""
    text = json.dumps(data, default=_tensor_to_json)
    framed = _with_bands(picture.convert("RGB"), zlib.compress(text.encode("utf-8"), level=9), _decoration(data))
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_KEY, base64.b64encode(text.encode("utf-8")).decode("ascii"))
    out = io.BytesIO()
    framed.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def _tensor_to_json(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {_TENSOR_KEY: value.detach().cpu().float().tolist()}
    raise TypeError(f"{type(value).__name__} cannot be stored in an embedding card")


def _tensor_from_json(obj: dict[str, Any]) -> Any:
    if _TENSOR_KEY in obj:
        return torch.tensor(obj[_TENSOR_KEY], dtype=torch.float32)
    return obj


def _mask_sequence(count: int) -> np.ndarray:
    """The low 4 bits of the first ``count`` values of the format's congruential sequence."""
    values = np.empty(count, dtype=np.uint8)
    state = 0
    for i in range(count):
        state = (1664525 * state + 1013904223) % 2**32
        values[i] = state % 255
    return values & 0x0F


def _masked(block: np.ndarray) -> np.ndarray:
    return block ^ _mask_sequence(block.size).reshape(block.shape)


def _with_bands(picture: Image.Image, payload: bytes, decoration: np.ndarray) -> Image.Image:
    height = picture.size[1]
    data = np.frombuffer(payload, dtype=np.uint8)
    # Whole columns of pixels: pad (by repeating the data; zlib ignores what follows its stream) to height x 3 cells.
    cells = height * _CHANNELS
    count = -(-data.size // cells) * cells
    bands = []
    for half in (data & 0x0F, data >> 4):
        block = _masked(np.resize(half, count).reshape(height, -1, _CHANNELS))
        # The high 4 bits never let a band pixel be black, so the border crop cannot eat into the data.
        bands.append(Image.fromarray(block | np.resize(decoration, block.shape), mode="RGB"))
    low, high = bands
    card = Image.new("RGB", (low.size[0] + 1 + picture.size[0] + 1 + high.size[0], height), (0, 0, 0))
    card.paste(low, (0, 0))
    card.paste(picture, (low.size[0] + 1, 0))
    card.paste(high, (low.size[0] + 1 + picture.size[0] + 1, 0))
    return card


def _decoration(data: dict[str, Any]) -> np.ndarray:
    """High 4 bits for the bands: a grey pattern from the first vector's magnitudes, never zero."""
    tensors = [v for v in _tensors(data)]
    first = tensors[0].reshape(-1)[:1024].abs() if tensors else torch.ones(1)
    scaled = (first / first.max().clamp_min(1e-12) * 7).round().to(torch.uint8).numpy()
    return ((scaled + 8) << 4).astype(np.uint8)  # 0x80-0xF0


def _tensors(data: dict[str, Any]) -> list[torch.Tensor]:
    params = data.get("string_to_param")
    values = params.values() if isinstance(params, dict) else data.values()
    return [v for v in values if isinstance(v, torch.Tensor)]


def _bands_payload(image: Image.Image) -> bytes | None:
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    lit = (pixels > 0).all(axis=2)
    rows, cols = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    if rows.size == 0:
        return None
    nibbles = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] & 0x0F
    empty = np.flatnonzero(nibbles.sum(axis=(0, 2)) == 0)
    if empty.size < 2:
        return None
    low = _masked(np.ascontiguousarray(nibbles[:, : empty.min()]))
    high = _masked(np.ascontiguousarray(nibbles[:, empty.max() + 1 :]))
    if low.shape != high.shape or low.size == 0:
        return None
    stream = ((high << 4) | low).reshape(-1).tobytes()
    try:
        return zlib.decompressobj().decompress(stream)
    except zlib.error:
        return None
