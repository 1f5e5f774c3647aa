from __future__ import annotations

import random
from pathlib import Path

import pytest

from embedding_trainer.errors import DatasetError
from embedding_trainer.templates import (
    BUILTIN_TEMPLATES,
    PromptBuilder,
    builtin_template_names,
    load_template,
    preview_prompt,
    template_for,
)


@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
def test_builtin_templates_load_and_every_line_has_name(name: str) -> None:
    lines = load_template(name)
    assert len(lines) >= 15
    assert all("[name]" in line for line in lines)
    assert all(line == line.strip() and line for line in lines)
    assert len(set(lines)) == len(lines)  # no accidental duplicates (they would skew the sampling)
    has_filewords = ["[filewords]" in line for line in lines]
    if name.endswith("_filewords"):
        assert all(has_filewords)
    else:
        assert not any(has_filewords)


def test_builtin_template_files_are_package_data() -> None:
    folder = Path(__file__).resolve().parents[2] / "embedding_trainer" / "templates"
    assert sorted(p.stem for p in folder.glob("*.txt")) == sorted(BUILTIN_TEMPLATES)


def test_custom_file_skips_blank_lines_strips_and_tolerates_bom(tmp_path: Path) -> None:
    path = tmp_path / "mine.txt"
    path.write_text("  a toy [name]  \n\n\ta [name] on a table, [filewords]\n", encoding="utf-8-sig")
    assert load_template(str(path)) == ["a toy [name]", "a [name] on a table, [filewords]"]


def test_line_without_name_is_refused_with_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "broken.txt"
    path.write_text("a photo of [name]\n\na photo of a dog\n", encoding="utf-8")
    with pytest.raises(DatasetError) as err:
        load_template(str(path))
    message = str(err.value)
    assert str(path) in message
    assert "line 3 lacks [name]" in message
    assert "a prompt without [name] trains nothing" in message


def test_several_lines_without_name_are_all_listed(tmp_path: Path) -> None:
    path = tmp_path / "broken.txt"
    path.write_text("a photo of [NAME]\na [name]\nart by [Name]\n", encoding="utf-8")
    with pytest.raises(DatasetError) as err:
        load_template(str(path))
    assert "lines 1, 3 lack [name]" in str(err.value)
    assert "case-sensitive" in str(err.value)


def test_unknown_name_lists_builtins() -> None:
    with pytest.raises(DatasetError) as err:
        load_template("portrait")
    message = str(err.value)
    assert "'portrait'" in message
    for name in BUILTIN_TEMPLATES:
        assert name in message


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "t.txt"
    with pytest.raises(DatasetError, match="does not exist") as err:
        load_template(str(missing))
    assert str(missing) in str(err.value)


def test_non_utf8_empty_and_folder_are_refused(tmp_path: Path) -> None:
    latin = tmp_path / "latin.txt"
    latin.write_bytes("un caf\u00e9 [name]\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="not UTF-8.*save it as UTF-8"):
        load_template(str(latin))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DatasetError, match="is empty"):
        load_template(str(empty))
    with pytest.raises(DatasetError, match="is a folder"):
        load_template(str(tmp_path))


def test_prompt_builder_substitutes_name_and_caption() -> None:
    builder = PromptBuilder(["a photo of [name], [filewords]"], "tok")
    assert builder.build("red, cat", random.Random(0)) == "a photo of tok, red, cat"
    # Without shuffle or dropout the caption is used verbatim (commas inside it are kept as written).
    assert builder.build("1,000 tiny cats", random.Random(0)) == "a photo of tok, 1,000 tiny cats"
    assert PromptBuilder(["[name]"], "tok").build("ignored", random.Random(0)) == "tok"


def test_empty_caption_leaves_no_stray_commas() -> None:
    rng = random.Random(0)
    assert PromptBuilder(["[filewords], a photo of [name]"], "tok").build("", rng) == "a photo of tok"
    assert PromptBuilder(["a [name], [filewords], high quality"], "tok").build("  ", rng) == "a tok, high quality"
    assert PromptBuilder(["a photo of [name] [filewords]"], "tok").build("", rng) == "a photo of tok"


def test_line_choice_follows_the_rng() -> None:
    lines = load_template("subject")
    builder = PromptBuilder(lines, "tok")
    first = [builder.build("", random.Random(7)) for _ in range(3)]
    assert len(set(first)) == 1  # same seed, same line
    rng = random.Random(1)
    chosen = {builder.build("", rng) for _ in range(200)}
    assert len(chosen) == len(lines)  # every line is reachable
    assert all("tok" in p and "[name]" not in p for p in chosen)


def test_shuffle_tags_permutes_with_the_rng() -> None:
    tags = ["a", "b", "c", "d", "e", "f"]
    builder = PromptBuilder(["[name], [filewords]"], "tok", shuffle_tags=True)
    results = []
    for seed in range(10):
        prompt = builder.build(", ".join(tags), random.Random(seed))
        assert prompt == builder.build(", ".join(tags), random.Random(seed))  # reproducible
        head, *rest = prompt.split(", ")
        assert head == "tok"
        assert sorted(rest) == tags  # nothing lost, nothing added
        results.append(rest)
    assert any(r != tags for r in results)
    assert len({tuple(r) for r in results}) > 5


def test_tag_dropout() -> None:
    caption = ", ".join(f"t{i}" for i in range(10))
    assert PromptBuilder(["a [name], [filewords]"], "tok", tag_dropout=1.0).build(caption, random.Random(0)) == "a tok"
    builder = PromptBuilder(["[filewords]|[name]"], "tok", tag_dropout=0.3)
    rng = random.Random(3)
    kept = 0
    for _ in range(300):
        words, trigger = builder.build(caption, rng).split("|")
        assert trigger == "tok"
        parts = [p for p in words.split(", ") if p]
        assert parts == sorted(parts, key=lambda t: int(t[1:]))  # dropout alone keeps the order
        kept += len(parts)
    assert 0.62 < kept / 3000 < 0.78  # about 70 % kept
    a = PromptBuilder(["[name], [filewords]"], "tok", tag_dropout=0.5)
    assert a.build(caption, random.Random(11)) == a.build(caption, random.Random(11))


def test_prompt_builder_rejects_bad_arguments() -> None:
    with pytest.raises(DatasetError, match="tag_dropout"):
        PromptBuilder(["[name]"], "tok", tag_dropout=1.5)
    with pytest.raises(DatasetError):
        PromptBuilder([], "tok")


def test_auto_uses_the_captions_only_when_every_image_has_a_caption_file() -> None:
    assert template_for("auto", captioned=4, images=4) == "subject_filewords"
    assert template_for(" auto ", captioned=3, images=4) == "subject"  # one would be captioned by its file name
    assert template_for("auto", captioned=0, images=4) == "subject"
    assert template_for("auto", captioned=0, images=0) == "subject"
    assert template_for("style", captioned=4, images=4) == "style"  # a chosen template is kept as it is
    assert builtin_template_names() == ("auto", *BUILTIN_TEMPLATES)
    with pytest.raises(DatasetError, match="'auto' depends on the images"):
        load_template("auto")


def test_the_preview_prompt_is_the_first_line_with_the_trigger_and_no_caption(tmp_path):
    assert preview_prompt("subject", "my-cat") == "a photo of a my-cat"
    assert preview_prompt("auto", "my-cat") == "a photo of a my-cat"
    custom = tmp_path / "t.txt"
    custom.write_text("[filewords], art by [name]\nignored [name]\n", encoding="utf-8")
    assert preview_prompt(str(custom), "zed") == "art by zed"
