"""Labels on image grids (the demo's and ``render``'s): wrapped text in Pillow's own font."""

from __future__ import annotations

from typing import Any

from PIL import ImageFont


def label_font(size: int) -> Any:
    """Pillow's own font at ``size`` (Pillow >= 10.1); older Pillows have only its small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def wrap_text(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters, broken between words."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line]
