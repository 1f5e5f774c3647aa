"""A real CLIP tokenizer with no hub access, built from CLIP's byte-pair-encoding merge list.

``assets/clip_bpe_16e6.txt.gz`` is the merge list OpenAI published with CLIP (MIT licence) and which OpenCLIP
ships too. From it we write the Hugging Face layout (``vocab.json`` + ``merges.txt``), whose ids are exactly
CLIP's: ``a photo of a`` -> 320 1125 539 320, start/end 49406/49407, 49408 entries.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

BPE_FILE = Path(__file__).with_name("assets") / "clip_bpe_16e6.txt.gz"
VOCAB_SIZE = 49408
START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """CLIP's reversible byte -> printable character map, in the order its vocabulary lists bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    order = list(printable)
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            order.append(byte)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_tokenizer_files(folder: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` into ``folder`` and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    # The first line is a version header; CLIP uses the first 49152 - 256 - 2 merges.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START_TOKEN, END_TOKEN]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    return folder
