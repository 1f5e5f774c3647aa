"""Prompt templates: one prompt per line, ``[name]`` becomes the trigger word, ``[filewords]`` the caption.

The built-in templates ship as package data in ``templates/*.txt`` (the same layout as the WebUI's
``textual_inversion_templates`` folder, so users can bring their own files).
"""

from __future__ import annotations

import importlib.resources
import random
import re
from collections.abc import Sequence
from pathlib import Path

from .errors import DatasetError

NAME_TOKEN = "[name]"
FILEWORDS_TOKEN = "[filewords]"
BUILTIN_TEMPLATES = ("subject", "subject_filewords", "style", "style_filewords")
#: The default: ``subject_filewords`` when every image has a caption file, else ``subject`` (``template_for``).
AUTO_TEMPLATE = "auto"


def builtin_template_names() -> tuple[str, ...]:
    """The names a template field accepts besides a file path: ``auto`` and the built-in templates."""
    return (AUTO_TEMPLATE, *BUILTIN_TEMPLATES)


def template_for(spec: str, captioned: int, images: int) -> str:
    """The template a run uses: ``auto`` is ``subject_filewords`` when all ``images`` have caption files
    (``captioned`` of them do), else ``subject``; any other name or path is itself.

    Captions that name what the concept is not (its colour, background, pose) keep those out of the embedding
    (benchmarks/RESULTS.md, "Captioned photos"); when some images lack one, their file name would stand in, so auto
    leaves captions out rather than train on file names.
    """
    if spec.strip() != AUTO_TEMPLATE:
        return spec
    return "subject_filewords" if images and captioned == images else "subject"


def _builtin_text(name: str) -> str:
    # importlib.resources also works when the package is imported from a zip; fall back to the module's folder
    # for loaders that do not support it.
    try:
        resource = importlib.resources.files(__package__ or "embedding_trainer") / "templates" / f"{name}.txt"
        return resource.read_text(encoding="utf-8")
    except (AttributeError, FileNotFoundError, ModuleNotFoundError, TypeError):
        return (Path(__file__).with_name("templates") / f"{name}.txt").read_text(encoding="utf-8")


def load_template(name_or_path: str) -> list[str]:
    """The prompt lines of a built-in template (by name) or of a UTF-8 text file (by path).

    Blank lines are skipped and lines are stripped. Every line must contain ``[name]``: a prompt without the
    trigger word gives the vectors no gradient, so such a template is refused instead of training nothing.
    """
    spec = str(name_or_path).strip()
    builtins = ", ".join(BUILTIN_TEMPLATES)
    if spec == AUTO_TEMPLATE:
        raise DatasetError("template: 'auto' depends on the images; choose it with template_for before loading it")
    if not spec:
        raise DatasetError(f"template: no template given; use a built-in name ({builtins}) or a file path")
    if spec in BUILTIN_TEMPLATES:
        source = f"built-in template '{spec}'"
        text = _builtin_text(spec)
    else:
        path = Path(spec).expanduser()
        source = f"template file '{path}'"
        if not path.exists():
            looks_like_name = not any(sep in spec for sep in ("/", "\\")) and not path.suffix
            if looks_like_name:
                raise DatasetError(
                    f"template: '{spec}' is neither a built-in template nor an existing file; "
                    f"use one of the built-in names ({builtins}) or the path of a text file"
                )
            raise DatasetError(
                f"template: file '{path}' does not exist; check the path or use a built-in template ({builtins})"
            )
        if path.is_dir():
            raise DatasetError(f"template: '{path}' is a folder; give the path of a text file with one prompt per line")
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DatasetError(f"template: cannot read {source} ({e.strerror or e}); check its permissions") from e
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DatasetError(
                f"template: {source} is not UTF-8 text (invalid byte at position {e.start}); save it as UTF-8"
            ) from e
    return _parse(text, source)


def _parse(text: str, source: str) -> list[str]:
    lines: list[str] = []
    missing: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if NAME_TOKEN not in line:
            missing.append((number, line))
        lines.append(line)
    if not lines:
        raise DatasetError(f"template: {source} is empty; write one prompt per line, each containing [name]")
    if missing:
        shown = ", ".join(str(number) for number, _ in missing[:20]) + (", ..." if len(missing) > 20 else "")
        hint = ""
        if any(NAME_TOKEN in line.lower() for _, line in missing):
            hint = " (the placeholder is case-sensitive: write [name] in lower case)"
        raise DatasetError(
            f"template: {source}, line{'s' if len(missing) > 1 else ''} {shown} lack{'' if len(missing) > 1 else 's'}"
            f" [name]: a prompt without [name] trains nothing; add [name] where the trigger word belongs{hint}"
        )
    return lines


_COMMA_RUNS = re.compile(r"\s*,(?:\s*,)+\s*")
_SPACE_BEFORE_COMMA = re.compile(r"\s+,")
_SPACES = re.compile(r"\s+")


def _tidy(prompt: str) -> str:
    # An empty caption leaves ", ," or a dangling comma behind, which CLIP would read as tokens. Single commas
    # inside the text ("1,000") are left as they are.
    prompt = _SPACES.sub(" ", prompt)
    prompt = _COMMA_RUNS.sub(", ", prompt)
    prompt = _SPACE_BEFORE_COMMA.sub(",", prompt)
    return prompt.strip(" ,")


class PromptBuilder:
    """Turns a caption into a training prompt: a random template line with the trigger and the caption filled in.

    All randomness comes from the ``rng`` passed to :meth:`build`, so a seeded run gives the same prompts.
    """

    def __init__(
        self,
        lines: Sequence[str],
        trigger: str,
        shuffle_tags: bool = False,
        tag_dropout: float = 0.0,
        template: str = "",
    ) -> None:
        if not lines:
            raise DatasetError("template: no prompt lines; write one prompt per line, each containing [name]")
        if not trigger:
            raise DatasetError("name: the trigger word is empty; give the embedding a name")
        if not 0.0 <= tag_dropout <= 1.0:
            raise DatasetError(f"tag_dropout: {tag_dropout!r} is outside 0..1; use a probability such as 0.1")
        self.lines = list(lines)
        self.template = template  # the name or path the lines came from
        self.trigger = trigger
        self.shuffle_tags = shuffle_tags
        self.tag_dropout = float(tag_dropout)
        self.uses_filewords = any(FILEWORDS_TOKEN in line for line in self.lines)

    def filewords(self, caption: str, rng: random.Random) -> str:
        """The caption after tag shuffling and dropout (tags are its comma-separated parts)."""
        if not self.shuffle_tags and self.tag_dropout == 0.0:
            return caption.strip()
        tags = [t.strip() for t in caption.split(",")]
        tags = [t for t in tags if t]
        if self.shuffle_tags:
            rng.shuffle(tags)
        if self.tag_dropout > 0.0:
            # ">=" so that 1.0 drops every tag and 0.0 none.
            tags = [t for t in tags if rng.random() >= self.tag_dropout]
        return ", ".join(tags)

    def build(self, caption: str, rng: random.Random) -> str:
        line = self.lines[rng.randrange(len(self.lines))]
        prompt = line.replace(NAME_TOKEN, self.trigger)
        if FILEWORDS_TOKEN in prompt:
            prompt = prompt.replace(FILEWORDS_TOKEN, self.filewords(caption, rng))
        return _tidy(prompt)


def preview_prompt(template: str, trigger: str) -> str:
    """A prompt for preview images: the template's first line with the trigger in place and no caption (``auto``'s
    two choices have the same first line)."""
    line = load_template(template_for(template, 0, 0))[0]
    return _tidy(line.replace(NAME_TOKEN, trigger).replace(FILEWORDS_TOKEN, ""))
