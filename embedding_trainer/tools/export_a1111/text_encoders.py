"""The text-encoder files beside the checkpoint: the local CLIP(-L) folder the yaml points at (config, weights,
tokenizer), and the open_clip model config of an OpenCLIP encoder that is not a built-in open_clip arch."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .common import ExportError, ModelParts, usual_mode
from .keys import convert_clip_text

#: The text towers of the open_clip architectures SD2 and SDXL use: (embed_dim, width, heads, layers).
BUILTIN_OPEN_CLIP_ARCHS = {"ViT-H-14": (1024, 1024, 16, 24), "ViT-bigG-14": (1280, 1280, 20, 32)}
#: The smallest vision tower open_clip builds: the host deletes it right after building the model.
_TINY_VISION = {"image_size": 32, "layers": 1, "width": 64, "head_width": 64, "patch_size": 32}


def open_clip_model_config(config: Mapping[str, Any], blocks: int, embed_dim: int) -> dict[str, Any]:
    """The open_clip model config (the JSON ``open_clip.add_model_config`` reads) of the text tower the host builds
    for this HF text config, with ``blocks`` transformer blocks; its vision tower is a minimal placeholder."""
    return {
        "embed_dim": embed_dim,
        "quick_gelu": config.get("hidden_act") == "quick_gelu",
        "vision_cfg": dict(_TINY_VISION),
        "text_cfg": {
            "context_length": int(config.get("max_position_embeddings", 77)),
            "vocab_size": int(config.get("vocab_size", 49408)),
            "width": int(config["hidden_size"]),
            "heads": int(config["num_attention_heads"]),
            "layers": blocks,
        },
    }


def open_clip_arch(parts: ModelParts, json_path: Path) -> tuple[str | None, dict[str, Any] | None]:
    """The arch name the yaml gives the host's OpenCLIP embedder, and the model config to write at ``json_path``
    (``None`` when the encoder is exactly a built-in open_clip text tower, or there is no OpenCLIP encoder)."""
    family = parts.family
    if family == "sd1":
        return None, None
    if family == "sd2":
        config, state = parts.text_encoder_config, parts.text_encoder
        blocks = int(config["num_hidden_layers"]) + 1  # + the never-run pad block (docs/export-a1111.md)
    else:
        assert parts.text_encoder_2_config is not None and parts.text_encoder_2 is not None
        config, state = parts.text_encoder_2_config, parts.text_encoder_2
        blocks = int(config["num_hidden_layers"])
    projection = state.get("text_projection.weight")
    embed_dim = int(projection.shape[0]) if projection is not None else int(config["hidden_size"])
    model_config = open_clip_model_config(config, blocks, embed_dim)
    text = model_config["text_cfg"]
    for name, (dim, width, heads, layers) in BUILTIN_OPEN_CLIP_ARCHS.items():
        if (
            (embed_dim, text["width"], text["heads"], text["layers"]) == (dim, width, heads, layers)
            and not model_config["quick_gelu"]
            and (text["context_length"], text["vocab_size"]) == (77, 49408)
        ):
            return name, None
    return json_path.name[: -len(".json")], model_config


_CLIP_TEXT_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "projection_dim",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
    "dropout",
    "initializer_range",
    "initializer_factor",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)


def _text_encoder_config_json(config: Mapping[str, Any]) -> str:
    """A config that transformers 4.30 (the WebUI's pin) and 5.x both read as a ``CLIPTextConfig``."""
    if config.get("model_type") not in (None, "clip_text_model"):
        raise ExportError(f"text encoder: model_type {config.get('model_type')!r} is not a CLIP text model")
    out = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "torch_dtype": "float32"}
    out.update({k: config[k] for k in _CLIP_TEXT_CONFIG_KEYS if k in config})
    return json.dumps(out, indent=2) + "\n"


def write_text_encoder_folder(parts: ModelParts, folder: Path, *, overwrite: bool, dtype: torch.dtype | None) -> None:
    from ...atomic_write import write_atomically

    folder.mkdir(parents=True, exist_ok=True)
    weights = convert_clip_text(parts.text_encoder)
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    buffer = io.BytesIO()
    torch.save({k: v.contiguous().clone() for k, v in weights.items()}, buffer)
    files = {"config.json": _text_encoder_config_json(parts.text_encoder_config).encode("utf-8")}
    files.update({name: text.encode("utf-8") for name, text in parts.tokenizer_files.items()})
    files["pytorch_model.bin"] = buffer.getvalue()
    for name, data in files.items():
        write_atomically(folder / name, lambda f, data=data: f.write(data), overwrite)
    usual_mode(*(folder / name for name in files))


def tokenizer_files(folder: Path) -> dict[str, str]:
    """The slow ``CLIPTokenizer``'s files (``vocab.json``, ``merges.txt``) plus its config, from a tokenizer
    folder that has them or only a fast ``tokenizer.json`` (what transformers 5 saves)."""
    files: dict[str, str] = {}
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        files["vocab.json"] = (folder / "vocab.json").read_text(encoding="utf-8")
        files["merges.txt"] = (folder / "merges.txt").read_text(encoding="utf-8")
    elif (folder / "tokenizer.json").is_file():
        model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("model", {})
        if model.get("type") != "BPE" or "vocab" not in model or "merges" not in model:
            raise ExportError(f"{folder / 'tokenizer.json'}: not a BPE tokenizer (a CLIP tokenizer is expected)")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        files["vocab.json"] = json.dumps(model["vocab"], ensure_ascii=False)
        files["merges.txt"] = "#version: 0.2\n" + "\n".join(merges) + "\n"
    else:
        raise ExportError(f"{folder}: no tokenizer files (vocab.json + merges.txt, or tokenizer.json)")
    config: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").is_file():
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    if (folder / "special_tokens_map.json").is_file():  # overrides the config (transformers 4.x saves both)
        config.update(json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8")))
    special = {}
    for name, default in (
        ("bos_token", "<|startoftext|>"),
        ("eos_token", "<|endoftext|>"),
        ("unk_token", "<|endoftext|>"),
        ("pad_token", "<|endoftext|>"),
    ):
        value = config.get(name, default)
        special[name] = value["content"] if isinstance(value, dict) else value
    max_length = config.get("model_max_length", 77)
    files["tokenizer_config.json"] = json.dumps(
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": int(max_length) if isinstance(max_length, int) and max_length < 10**6 else 77,
            "do_lower_case": True,
            "errors": "replace",
            **special,
        },
        indent=2,
    )
    files["special_tokens_map.json"] = json.dumps(special, indent=2)
    return files
