"""Reading textual-inversion embedding files: every layout in ``_UNDERSTOOD_LAYOUTS``, mapped onto a model's encoders.

Pickled files are only ever opened with ``torch.load(weights_only=True)``: an embedding file must never be able to
run code.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import safetensors
import torch

from .embedding_card import CARD_SUFFIXES, read_card
from .embedding_file import (
    LAYOUT_A1111,
    LAYOUT_CARD,
    LAYOUT_EMB_PARAMS,
    LAYOUT_EMP_PARAMS,
    LAYOUT_RUN_STATE,
    LAYOUT_SDXL,
    LAYOUT_SINGLE_KEY,
    PICKLE_SUFFIXES,
    PT_METADATA_KEY,
    RESERVED_HEADER_KEYS,
    SAFETENSORS_SUFFIXES,
    SDXL_KEYS,
    SINGLE_KEY,
    EmbeddingData,
    metadata_str,
    quiet_typed_storage,
    width_family,
)
from .errors import EmbeddingFileError
from .host import EncoderInfo

#: Tensor-name prefixes of this trainer's run state (``run_state.py``).
_RUN_STATE_PREFIXES = ("vectors.", "optimizer.", "scaler.")

_UNDERSTOOD_LAYOUTS = (
    "understood layouts: the WebUI's .pt dict {'string_to_param': {'*': [n, d]}, ...}; "
    "a single tensor [n, d] or [d] under any key in .safetensors/.pt/.bin "
    "(e.g. 'emb_params', OneTrainer's 'emp_params', a diffusers '<token>' key); "
    "SDXL {'clip_l': [n, 768], 'clip_g': [n, 1280]} in .safetensors/.pt/.bin; "
    "the WebUI's picture cards (.png/.webp, its text chunk or its data bands)"
)


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
    metadata = {k: v for k, v in header.items() if k not in RESERVED_HEADER_KEYS}
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
    metadata = {k: v for k, v in header.items() if k not in RESERVED_HEADER_KEYS}
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
        extra = obj.get(PT_METADATA_KEY)
        if isinstance(extra, dict):
            metadata.update({str(k): metadata_str(v) for k, v in extra.items()})
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
        with _allow_parameter_dict(), quiet_typed_storage():
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
