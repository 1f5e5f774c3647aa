"""What the CLI's ``inspect`` and ``convert`` do with an embedding file: describe it, or rewrite it in another
layout."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .embedding_file import (
    LAYOUT_RUN_STATE,
    SAFETENSORS_SUFFIXES,
    container_for_write,
    file_sha256,
    save_embedding,
    width_family,
)
from .embedding_reading import load_embedding
from .errors import EmbeddingFileError


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
    container_for_write(dst, None)  # fail on a bad suffix before reading anything
    image = None
    if picture is not None:
        try:
            with Image.open(picture) as opened:
                image = opened.convert("RGB")
        except OSError as e:
            raise EmbeddingFileError(f"{picture}: cannot be read as a picture for the card ({e})") from e
    data = load_embedding(src)
    return save_embedding(data, dst, overwrite=overwrite, picture=image)
