"""Reading, writing, inspecting and converting textual-inversion embedding files.

Writes two layouts that every common host loads:

* ``.safetensors``: one encoder -> ``{"emb_params": [n, d]}``; SDXL -> ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``.
  Name, step and free-form metadata go into the header (hosts ignore it; our tools read it back).
* ``.pt``: the WebUI's own dict (``string_to_param`` etc.) for one encoder, ``{"clip_l", "clip_g"}`` for SDXL, in
  torch's legacy (non-zip) pickle format, because A1111 v1.10.1's safe unpickler rejects the zip archives that
  recent torch versions write.

Reads every layout the WebUI reads (apart from image cards). Pickled files are only ever opened with
``torch.load(weights_only=True)``: an embedding file must never be able to run code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import safetensors
import safetensors.torch
import torch

from .embedding_card import CARD_SUFFIXES, card_bytes, read_card
from .errors import EmbeddingFileError
from .host import EncoderInfo
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
_RUN_STATE_PREFIXES = ("vectors.", "optimizer.", "scaler.")

# Header keys we own; everything else in a safetensors header is user metadata.
_RESERVED_HEADER_KEYS = ("name", "step", "num_vectors", "embtrain_format")
# Extra keys in our single-encoder .pt dict; hosts read the dict with .get() and ignore unknown keys.
_PT_FORMAT_KEY = "embtrain_format"
_PT_METADATA_KEY = "embtrain_metadata"

_UNDERSTOOD_LAYOUTS = (
    "understood layouts: the WebUI's .pt dict {'string_to_param': {'*': [n, d]}, ...}; "
    "a single tensor [n, d] or [d] under any key in .safetensors/.pt/.bin "
    "(e.g. 'emb_params', OneTrainer's 'emp_params', a diffusers '<token>' key); "
    "SDXL {'clip_l': [n, 768], 'clip_g': [n, 1280]} in .safetensors/.pt/.bin; "
    "the WebUI's picture cards (.png/.webp, its text chunk or its data bands)"
)

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
    container = _container_for_write(path, layout)
    tensors = _tensors_for_write(data, path)
    if path.is_dir():
        raise EmbeddingFileError(f"{path}: is a folder; give a file name ending in .safetensors or .pt")
    if path.exists() and not overwrite:
        raise _exists_error(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    if container == "safetensors":
        if len(tensors) == 1:
            tensors = {"emb_params": next(iter(tensors.values()))}
        header = {str(k): _metadata_str(v) for k, v in data.metadata.items()}
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
            _PT_FORMAT_KEY: FORMAT_VERSION,
            _PT_METADATA_KEY: {str(k): _metadata_str(v) for k, v in data.metadata.items()},
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
    with _quiet_typed_storage():
        torch.save(obj, f, _use_new_zipfile_serialization=False)


@contextlib.contextmanager
def _quiet_typed_storage() -> Iterator[None]:
    # torch 2.1's legacy-format reader and writer use TypedStorage and warn about its deprecation: not actionable.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
        yield


def _container_for_write(path: Path, layout: str | None) -> str:
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


def _metadata_str(value: Any) -> str:
    # Headers hold strings only; anything else is stored as JSON so it can be parsed back.
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _exists_error(path: Path) -> EmbeddingFileError:
    return EmbeddingFileError(
        f"{path}: file already exists; choose another name or allow replacing it (--overwrite; overwrite in the API)"
    )


def write_atomically(path: Path, write: Callable[[IO[bytes]], None], overwrite: bool) -> None:
    """Write via a temporary file in the target folder, so readers never see a half-written file.

    ``write`` receives the open temporary file; an existing ``path`` is replaced only when ``overwrite``.

    The temporary name ends in ``.tmp``, which the WebUI's embedding scanner ignores.
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        if overwrite:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
        _fsync_dir(path.parent)
    finally:
        # Also on KeyboardInterrupt: never leave the temporary file behind.
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _place_new(tmp: Path, path: Path) -> None:
    # A hard link fails if the target appeared meanwhile, unlike os.replace; fall back where links are unsupported.
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise _exists_error(path) from None
    except (OSError, NotImplementedError):
        pass
    if path.exists():
        raise _exists_error(path)
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename durable on POSIX; folders cannot be opened this way on Windows.
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


# ---------------------------------------------------------------------------------------------------------------
# Reading


def load_embedding(path: str | os.PathLike[str], encoders: tuple[EncoderInfo, ...] | None = None) -> EmbeddingData:
    """Read any understood layout. With ``encoders``, map the vectors onto the model's encoder keys and check
    every width; without, a single-tensor file gets the key ``"vec"`` and an SDXL file ``clip_l``/``clip_g``."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "file not found"
        raise EmbeddingFileError(f"{path}: {what}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        data = _read_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        data = _embedding_from_dict(path, _torch_load_safely(path), LAYOUT_A1111)
    elif suffix in CARD_SUFFIXES:
        data = _embedding_from_dict(path, read_card(path), LAYOUT_CARD)
    else:
        raise EmbeddingFileError(
            f"{path}: unknown suffix {suffix or '(none)'!r}; embedding files end in .safetensors, .pt, .bin or .png "
            f"({_UNDERSTOOD_LAYOUTS})"
        )
    if encoders is not None:
        data.vectors = _map_to_encoders(path, data.vectors, encoders)
    return data


def _read_safetensors(path: Path) -> EmbeddingData:
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            header = dict(f.metadata() or {})
            keys = list(f.keys())
            if _is_run_state(keys, header):
                return _read_run_state(path, header, {k: f.get_tensor(k) for k in keys if k.startswith("vectors.")})
            layout, selected = _classify_keys(path, keys)
            raw = {k: f.get_tensor(k) for k in selected}
    except EmbeddingFileError:
        raise
    except Exception as e:  # the Rust reader raises its own error types for bad headers / truncated data
        raise EmbeddingFileError(f"{path}: not a readable safetensors file ({e}); {_UNDERSTOOD_LAYOUTS}") from e
    vectors = _vectors_from_raw(path, layout, raw)
    metadata = {k: v for k, v in header.items() if k not in _RESERVED_HEADER_KEYS}
    return EmbeddingData(
        name=header.get("name") or path.stem,
        vectors=vectors,
        step=_parse_step(header.get("step")),
        metadata=metadata,
        layout=layout,
    )


def _is_run_state(keys: list[str], header: dict[str, str]) -> bool:
    return (
        "config" in header
        and any(k.startswith("vectors.") for k in keys)
        and all(k.startswith(_RUN_STATE_PREFIXES) for k in keys)
    )


def _read_run_state(path: Path, header: dict[str, str], tensors: dict[str, torch.Tensor]) -> EmbeddingData:
    """The vectors of a saved run state, readable as the embedding of that step (``inspect`` says what it is)."""
    raw = {key.removeprefix("vectors."): t for key, t in tensors.items()}
    vectors = _vectors_from_raw(path, LAYOUT_SDXL if set(raw) == set(SDXL_KEYS) else LAYOUT_SINGLE_KEY, raw)
    try:
        name = str(json.loads(header["config"]).get("name") or path.stem)
    except (ValueError, AttributeError):
        name = path.stem
    step = (_parse_step(header.get("step")) or 0) + (_parse_step(header.get("base_step")) or 0)
    metadata = {k: v for k, v in header.items() if k not in _RESERVED_HEADER_KEYS}
    return EmbeddingData(name=name, vectors=vectors, step=step, metadata=metadata, layout=LAYOUT_RUN_STATE)


def _classify_keys(path: Path, keys: list[str]) -> tuple[str, list[str]]:
    """Layout and tensor keys of a flat {key: tensor} file (safetensors, or the tensors of a pickled dict)."""
    outputs = [k for k in keys if k.endswith("_out") and k.removesuffix("_out") in keys]
    if outputs:
        raise EmbeddingFileError(
            f"{path}: a OneTrainer embedding saved with its output-embedding option ({_key_list(outputs)} beside "
            f"{_key_list([k.removesuffix('_out') for k in outputs])}): what it learned acts on the text encoder's "
            "output, which A1111, Forge, ComfyUI and diffusers cannot apply, and its input vectors are left at zero, "
            "so it cannot be used as a plain embedding. Train it again in OneTrainer with the output embedding off "
            "(or here)."
        )
    if "clip_l" in keys and "clip_g" in keys:
        extra = [k for k in keys if k not in SDXL_KEYS]
        if extra:
            raise EmbeddingFileError(
                f"{path}: an SDXL embedding holds only clip_l and clip_g, but this file also has {_key_list(extra)}; "
                f"{_UNDERSTOOD_LAYOUTS}"
            )
        return LAYOUT_SDXL, list(SDXL_KEYS)
    if len(keys) == 1:
        key = keys[0]
        layout = {"emb_params": LAYOUT_EMB_PARAMS, "emp_params": LAYOUT_EMP_PARAMS}.get(key, LAYOUT_SINGLE_KEY)
        return layout, [key]
    if not keys:
        raise EmbeddingFileError(f"{path}: holds no tensors; {_UNDERSTOOD_LAYOUTS}")
    raise EmbeddingFileError(
        f"{path}: holds {len(keys)} tensors ({_key_list(keys)}), which is not an embedding layout "
        f"(is it a LoRA or a model checkpoint?); {_UNDERSTOOD_LAYOUTS}"
    )


def _key_list(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _embedding_from_dict(path: Path, obj: Any, webui_layout: str) -> EmbeddingData:
    """An embedding from the WebUI's dict (``string_to_param``: reported as ``webui_layout``) or a flat dict of
    tensors (a ``.pt``/``.bin`` or a card)."""
    if not isinstance(obj, dict):
        raise EmbeddingFileError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors; {_UNDERSTOOD_LAYOUTS}")
    metadata: dict[str, str] = {}
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        # Files from the original textual-inversion repo store an nn.ParameterDict, whose items are in _parameters.
        params = getattr(params, "_parameters", params)
        if not isinstance(params, dict) or len(params) != 1:
            count = len(params) if isinstance(params, dict) else type(params).__name__
            raise EmbeddingFileError(
                f"{path}: 'string_to_param' must hold exactly one tensor, found {count}; {_UNDERSTOOD_LAYOUTS}"
            )
        layout, raw = webui_layout, {SINGLE_KEY: next(iter(params.values()))}
        extra = obj.get(_PT_METADATA_KEY)
        if isinstance(extra, dict):
            metadata.update({str(k): _metadata_str(v) for k, v in extra.items()})
        for src, dst in (("sd_checkpoint", "base_model_hash"), ("sd_checkpoint_name", "base_model_name")):
            if isinstance(obj.get(src), str) and obj[src] and dst not in metadata:
                metadata[dst] = obj[src]
    else:
        # Plain entries such as a name or step next to the tensors are tolerated; the tensors decide the layout.
        tensor_keys = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
        layout, selected = _classify_keys(path, [str(k) for k in tensor_keys])
        raw = {k: obj[k] for k in selected}
    vectors = _vectors_from_raw(path, layout, raw)
    name = obj.get("name")
    return EmbeddingData(
        name=name if isinstance(name, str) and name else path.stem,
        vectors=vectors,
        step=_parse_step(obj.get("step")),
        metadata=metadata,
        layout=layout,
    )


def _torch_load_safely(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers; turns every failure into EmbeddingFileError."""
    try:
        with _allow_parameter_dict(), _quiet_typed_storage():
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        reason = _weights_only_reason(msg)
        if "persistent_load" in msg and "<class 'str'>" in msg:
            # The pre-1.6 torch format stores a module's class with its source code (the original textual-inversion
            # code saved its nn.ParameterDict that way); the weights-only reader refuses that record, not malice.
            raise EmbeddingFileError(
                f"{path}: an old-format torch file (written before torch 1.6) that holds a torch module, most likely "
                "the nn.ParameterDict of the original textual-inversion code; torch's weights-only reader cannot "
                "read that format. If it comes from a source you trust, re-save it once with a current torch "
                "(torch.load, then torch.save or a .safetensors conversion) and use the new file."
            ) from e
        if "Weights only load failed" in msg and "Unsupported operand" not in msg:
            raise EmbeddingFileError(
                f"{path}: refusing to execute pickled code: the file contains objects other than tensors and plain "
                f"containers ({reason}). Loading it could run arbitrary code. If you trust its source, convert it "
                "to .safetensors in a separate Python session (torch.load(..., weights_only=False), then "
                "safetensors.torch.save_file) and use the converted file."
            ) from e
        raise EmbeddingFileError(f"{path}: corrupt or not a torch file ({reason}); {_UNDERSTOOD_LAYOUTS}") from e
    except Exception as e:  # RuntimeError (bad zip / magic number), EOFError (truncated), ...
        raise EmbeddingFileError(
            f"{path}: corrupt or not a torch file ({type(e).__name__}: {_short(str(e)) or 'no details'}); "
            f"{_UNDERSTOOD_LAYOUTS}"
        ) from e


@contextlib.contextmanager
def _allow_parameter_dict() -> Iterator[None]:
    """Let weights-only loading rebuild nn.ParameterDict (old embeddings use it) where this torch supports it.

    ``torch.serialization.safe_globals`` exists from torch 2.5; older versions simply refuse such files.
    """
    ser = torch.serialization
    if not hasattr(ser, "safe_globals") or not hasattr(ser, "get_safe_globals"):
        yield
        return
    if torch.nn.ParameterDict in ser.get_safe_globals():
        yield  # already allowed by the application; leaving the context must not remove it
        return
    with ser.safe_globals([torch.nn.ParameterDict]):
        yield


def _weights_only_reason(msg: str) -> str:
    """The one informative line of torch's long weights-only error (which global or opcode it refused)."""
    if "WeightsUnpickler error:" in msg:
        msg = msg.split("WeightsUnpickler error:", 1)[1]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch")
    for line in msg.splitlines():
        line = line.strip()
        if line and not line.startswith(boilerplate):
            return _short(line)
    return "no details"


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _parse_step(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return max(int(value.strip()), 0)
    return 0


def _vectors_from_raw(path: Path, layout: str, raw: dict[str, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        if not isinstance(t, torch.Tensor):
            raise EmbeddingFileError(
                f"{path}: entry {key!r} is a {type(t).__name__}, not a tensor; {_UNDERSTOOD_LAYOUTS}"
            )
        if not t.is_floating_point():
            raise EmbeddingFileError(f"{path}: tensor {key!r} has dtype {t.dtype}, expected floating point values")
        if t.dim() == 1 and layout != LAYOUT_SDXL:
            t = t.unsqueeze(0)  # diffusers concepts may store one vector as [d]
        if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
            raise EmbeddingFileError(
                f"{path}: tensor {key!r} has shape {list(t.shape)}, expected [n, width]; {_UNDERSTOOD_LAYOUTS}"
            )
        t = t.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
        if not bool(torch.isfinite(t).all()):
            raise EmbeddingFileError(
                f"{path}: tensor {key!r} contains NaN or infinite values; the embedding is broken (retrain it or "
                "use an earlier save)"
            )
        out[SINGLE_KEY if layout != LAYOUT_SDXL else key] = t
    if layout == LAYOUT_SDXL and out["clip_l"].shape[0] != out["clip_g"].shape[0]:
        raise EmbeddingFileError(
            f"{path}: clip_l has {out['clip_l'].shape[0]} vectors but clip_g has {out['clip_g'].shape[0]}; "
            "both must have the same count"
        )
    return out


def _map_to_encoders(
    path: Path, vectors: dict[str, torch.Tensor], encoders: tuple[EncoderInfo, ...]
) -> dict[str, torch.Tensor]:
    if not encoders:
        raise EmbeddingFileError(f"{path}: the model reports no text encoders to load the embedding into")
    is_sdxl_file = set(vectors) == set(SDXL_KEYS)
    if not is_sdxl_file:
        (t,) = vectors.values()
        if len(encoders) != 1:
            raise EmbeddingFileError(
                f"{path}: this is a single-encoder SD1/SD2 embedding (width {t.shape[1]}, {width_family(t.shape[1])}); "
                f"SDXL needs clip_l and clip_g. Use an embedding trained for SDXL"
            )
        enc = encoders[0]
        _check_width(path, "the embedding", t.shape[1], enc)
        return {enc.key: t}
    if len(encoders) == 1:
        enc = encoders[0]
        raise EmbeddingFileError(
            f"{path}: this is an SDXL embedding (clip_l width {vectors['clip_l'].shape[1]}, clip_g width "
            f"{vectors['clip_g'].shape[1]}), but the model has a single text encoder ({enc.key}, width {enc.width}, "
            f"{width_family(enc.width)}). Use an embedding trained for this model family"
        )
    keys = {e.key for e in encoders}
    if keys != set(SDXL_KEYS):
        raise EmbeddingFileError(
            f"{path}: the file holds clip_l and clip_g, but the model's encoders are {sorted(keys)}"
        )
    for enc in encoders:
        _check_width(path, enc.key, vectors[enc.key].shape[1], enc)
    return {enc.key: vectors[enc.key] for enc in encoders}


def _check_width(path: Path, what: str, found: int, enc: EncoderInfo) -> None:
    if found != enc.width:
        raise EmbeddingFileError(
            f"{path}: {what} has width {found} ({width_family(found)}), but the model's {enc.key} encoder expects "
            f"width {enc.width} ({width_family(enc.width)}). Use an embedding trained for this model family"
        )


# ---------------------------------------------------------------------------------------------------------------
# Inspecting and converting


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of the file's bytes (the WebUI shows the first 10-12 characters as the embedding's hash)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def inspect_embedding(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything the CLI's ``inspect`` shows about a file, as plain data."""
    path = Path(path)
    data = load_embedding(path)
    encoders: dict[str, dict[str, Any]] = {}
    for key, t in data.vectors.items():
        width = int(t.shape[1])
        encoders[key] = {
            "width": width,
            "family": width_family(width),
            "norms": [float(x) for x in t.norm(dim=1)],
        }
    return {
        "path": str(path),
        "layout": data.layout,
        "container": "safetensors" if path.suffix.lower() in SAFETENSORS_SUFFIXES else "pickle",
        "name": data.name,
        "step": data.step,
        "num_vectors": data.num_vectors,
        "encoders": encoders,
        "metadata": dict(data.metadata),
        "sha256": file_sha256(path),
        "size_bytes": path.stat().st_size,
    }


def format_inspection(info: dict[str, Any]) -> str:
    """Human-readable, multi-line text for an :func:`inspect_embedding` result."""
    lines = [
        f"file:        {info['path']}",
        f"layout:      {info['layout']} ({info['container']})",
        f"name:        {info['name']}",
        f"step:        {info['step']}",
        f"vectors:     {info['num_vectors']}",
        f"sha256:      {info['sha256']} (short {info['sha256'][:10]})",
        f"size:        {info['size_bytes']} bytes",
    ]
    for key, enc in info["encoders"].items():
        norms = enc["norms"]
        shown = ", ".join(f"{x:.4g}" for x in norms[:16]) + (", ..." if len(norms) > 16 else "")
        mean = sum(norms) / len(norms) if norms else math.nan
        lines.append(f"encoder {key}: width {enc['width']} ({enc['family']})")
        lines.append(f"  L2 norms: {shown} (mean {mean:.4g})")
    if info["layout"] == LAYOUT_RUN_STATE:
        embedding = Path(info["path"]).name.replace(".state.safetensors", ".safetensors")
        lines.append(
            "note:        a resumable run state of Embedding Trainer (vectors and optimiser moments), not a file to "
            f"share: continue its run with `train --resume {info['path']}`; the embedding of this step is {embedding} "
            "beside it"
        )
    if info["metadata"]:
        lines.append("metadata:")
        for k in sorted(info["metadata"]):
            v = " ".join(info["metadata"][k].split())  # JSON settings on one line
            lines.append(f"  {k}: {v if len(v) <= 200 else v[:200] + '...'}")
    else:
        lines.append("metadata:    (none)")
    return "\n".join(lines)


def convert_embedding(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    picture: str | os.PathLike[str] | None = None,
) -> Path:
    """Read ``src`` in any understood layout and write the layout of ``dst``'s suffix, keeping name, step and
    metadata (an SDXL ``.pt`` or card cannot hold them: see :func:`save_embedding`). ``picture``: the image file a
    ``.png`` card shows."""
    from PIL import Image

    dst = Path(dst)
    _container_for_write(dst, None)  # fail on a bad suffix before reading anything
    image = None
    if picture is not None:
        try:
            with Image.open(picture) as opened:
                image = opened.convert("RGB")
        except OSError as e:
            raise EmbeddingFileError(f"{picture}: cannot be read as a picture for the card ({e})") from e
    data = load_embedding(src)
    return save_embedding(data, dst, overwrite=overwrite, picture=image)
