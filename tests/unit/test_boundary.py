"""The core's dependency boundary, the package data, and the library logger's manners.

The core (the modules directly in ``embedding_trainer/`` and the ``trainer/`` package) runs inside the WebUI, so it
may import only torch, numpy, PIL, safetensors, the standard library and other core modules; model-specific code
lives in the subpackages ``hosts/``, ``standalone/`` and ``toyworld/`` (the toy base model is built with diffusers),
which the core never imports. It never prints, and its logger stays silent until an application attaches a handler.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.resources
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import embedding_trainer

pytestmark = pytest.mark.compat

PACKAGE = Path(embedding_trainer.__file__).parent
ALLOWED_THIRD_PARTY = {"torch", "numpy", "PIL", "safetensors"}
#: ``python -m embedding_trainer`` must dispatch to the CLI; it is an entry point, not part of the core.
ENTRY_POINTS = {"__main__.py"}
#: Subpackages that are part of the core (every file in them is checked as a core module).
CORE_PACKAGES = ("trainer",)
SUBPACKAGES = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} - set(CORE_PACKAGES)
TOP_FILES = sorted(p for p in PACKAGE.glob("*.py") if p.name not in ENTRY_POINTS)
CORE_FILES = TOP_FILES + sorted(p for name in CORE_PACKAGES for p in (PACKAGE / name).glob("*.py"))
#: What ``from .X import`` may name at the top level, and inside each core package.
CORE_MODULES = {p.stem for p in TOP_FILES} | set(CORE_PACKAGES)
PACKAGE_MODULES = {name: {p.stem for p in (PACKAGE / name).glob("*.py")} for name in CORE_PACKAGES}
TEMPLATES = ("subject", "subject_filewords", "style", "style_filewords")
#: SHA-256 of OpenAI's published bpe_simple_vocab_16e6.txt.gz (the same file ships with CLIP and OpenCLIP).
CLIP_BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def _relative(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def import_problems(path: Path, package: str | None = None) -> list[str]:
    """Every import in ``path`` (at any depth, including inside functions) that leaves the core's boundary.

    ``package``: the core package ``path`` is in (default: from where it lies; a file outside the package counts as a
    top-level module); its relative imports reach its own modules with one dot and the top level with two."""
    if package is None:
        package = path.parent.name if path.parent.parent == PACKAGE and path.parent.name in CORE_PACKAGES else ""
    depth = 2 if package else 1  # the dots that reach the top level
    problems = []
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                problems += _absolute_problem(alias.name, where)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                problems += _absolute_problem(node.module or "", where)
            elif node.level > depth:
                problems.append(f"{where}: 'from {'.' * node.level}{node.module or ''}' reaches outside the package")
            else:
                inside = package if node.level < depth else ""
                problems += _relative_problem(node, inside, where)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                problems.append(f"{where}: dynamic import ({name}) hides what the core depends on")
    return problems


def _relative_problem(node: ast.ImportFrom, package: str, where: str) -> list[str]:
    """``from .X import ...`` relative to the top level (``package`` ""), or to the core package ``package``."""
    dots = "." * node.level
    allowed = PACKAGE_MODULES[package] if package else CORE_MODULES
    if node.module:
        if node.module.split(".")[0] not in allowed:
            return [f"{where}: 'from {dots}{node.module} import ...' is not a core module"]
        return []
    names = [alias.name for alias in node.names]
    if package:  # ``from . import x`` inside a core package: its own modules
        return [f"{where}: 'from {dots} import {n}' is not a module of {package}" for n in names if n not in allowed]
    return [f"{where}: 'from {dots} import {n}' imports a non-core subpackage" for n in names if n in SUBPACKAGES]


def _absolute_problem(module: str, where: str) -> list[str]:
    parts = module.split(".")
    top = parts[0]
    if top == "embedding_trainer":
        if len(parts) > 1 and parts[1] not in CORE_MODULES and parts[1] != "__version__":
            return [f"{where}: 'import {module}' is not a core module"]
        return []
    if top in ALLOWED_THIRD_PARTY or top in sys.stdlib_module_names:
        return []
    return [f"{where}: 'import {module}': {top} is outside the core's dependencies"]


def test_the_core_is_what_the_boundary_test_checks() -> None:
    # A refactor that moves the trainer elsewhere must not leave this test checking nothing.
    assert {"config", "dataset", "embedding_file", "host", "log", "trainer", "templates"} <= CORE_MODULES
    assert SUBPACKAGES == {"hosts", "standalone", "tools", "toyworld", "webui"}
    assert {"__init__", "preflight", "objective", "step", "scoring", "run_log", "outputs", "loop"} <= PACKAGE_MODULES[
        "trainer"
    ]
    assert {_relative(p) for p in CORE_FILES} >= {"trainer/__init__.py", "trainer/loop.py", "config.py"}
    assert (PACKAGE / "__main__.py").is_file()


@pytest.mark.parametrize("path", CORE_FILES, ids=_relative)
def test_core_module_imports_stay_inside_the_boundary(path: Path) -> None:
    assert import_problems(path) == []


def test_the_boundary_check_catches_violations(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os\nimport transformers\nfrom diffusers import UNet2DConditionModel\nfrom .hosts import x\n"
        "from . import standalone\nfrom .config import TrainConfig\nimport embedding_trainer.standalone.cli\n"
        "from .. import y\n"
        "def f():\n    import huggingface_hub\n    return __import__('gradio')\n",
        encoding="utf-8",
    )
    problems = import_problems(bad)
    assert [p.split(":")[1] for p in problems] == ["2", "3", "4", "5", "7", "8", "10", "11"]


def test_the_boundary_check_catches_violations_inside_a_core_package(tmp_path: Path) -> None:
    bad = tmp_path / "part.py"
    bad.write_text(
        "from ..config import TrainConfig\nfrom .loop import RunLoop\nfrom .. import __version__\n"
        "from . import step\nfrom ..hosts.diffusers_host import DiffusersHost\nfrom ..standalone import cli\n"
        "from ... import z\nfrom .. import webui\nfrom . import nowhere\nfrom .nowhere import x\n"
        "import embedding_trainer.trainer.loop\nimport embedding_trainer.webui\n",
        encoding="utf-8",
    )
    problems = import_problems(bad, package="trainer")
    assert [p.split(":")[1] for p in problems] == ["5", "6", "7", "8", "9", "10", "12"]


def test_the_entry_point_only_dispatches_to_the_cli() -> None:
    tree = ast.parse((PACKAGE / "__main__.py").read_text(encoding="utf-8"))
    imported = sorted(
        ("." * n.level + (n.module or "")) if isinstance(n, ast.ImportFrom) else n.names[0].name
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
    )
    assert imported == [".standalone.cli", "sys"]


@pytest.mark.parametrize("path", CORE_FILES, ids=_relative)
def test_core_modules_never_print(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    calls = [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("print", "breakpoint")
    ]
    assert calls == [], f"{path.name} calls print() on lines {calls}; use embedding_trainer.log.logger"


def test_importing_the_core_loads_no_host_library_and_leaves_logging_alone() -> None:
    """In a fresh interpreter: import every core module, then look at sys.modules and the loggers."""
    modules = sorted(CORE_MODULES - {"__init__"}) + [
        f"{name}.{stem}" for name, stems in PACKAGE_MODULES.items() for stem in sorted(stems - {"__init__"})
    ]
    code = f"""
import json, logging, sys
root_handlers = list(logging.getLogger().handlers)
for name in {modules!r}:
    __import__("embedding_trainer." + name)
from embedding_trainer.log import logger
print(json.dumps({{
    "loaded": sorted({{m.split(".")[0] for m in sys.modules}} | {{m for m in sys.modules if "." in m}}),
    "name": logger.name,
    "propagate": logger.propagate,
    "handlers": [type(h).__name__ for h in logger.handlers],
    "level": logger.level,
    "root_handlers_added": len(logging.getLogger().handlers) - len(root_handlers),
}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", "importing the core wrote to stderr:\n" + done.stderr
    report = json.loads(done.stdout)
    loaded = set(report["loaded"])
    for forbidden in ("transformers", "diffusers", "huggingface_hub", "accelerate", "gradio", "modules"):
        assert forbidden not in loaded
    assert not {m for m in loaded if m.startswith(("embedding_trainer.hosts", "embedding_trainer.standalone"))}
    assert {f"embedding_trainer.{m}" for m in modules} <= loaded
    assert report["name"] == "embedding_trainer"
    assert report["propagate"] is False
    assert report["handlers"] == ["NullHandler"]
    assert report["level"] == 0  # NOTSET: the application decides
    assert report["root_handlers_added"] == 0


# ---------------------------------------------------------------------------------------------------------------
# Package data


def test_the_four_builtin_templates_ship_as_package_data() -> None:
    folder = importlib.resources.files("embedding_trainer") / "templates"
    names = sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".txt"))
    assert names == sorted(f"{t}.txt" for t in TEMPLATES)
    from embedding_trainer.templates import BUILTIN_TEMPLATES, load_template

    assert set(BUILTIN_TEMPLATES) == set(TEMPLATES)
    for name in TEMPLATES:
        lines = [line.strip() for line in (folder / f"{name}.txt").read_text(encoding="utf-8").splitlines()]
        lines = [line for line in lines if line]
        assert len(lines) == 20, name
        assert all("[name]" in line for line in lines), name
        assert all(("[filewords]" in line) == name.endswith("_filewords") for line in lines), name
        assert load_template(name) == lines


def test_the_clip_bpe_asset_ships_and_is_clips_file() -> None:
    asset = importlib.resources.files("embedding_trainer") / "tools" / "assets" / "clip_bpe_16e6.txt.gz"
    raw = asset.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == CLIP_BPE_SHA256
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    assert lines[0].endswith("#version: 0.2")
    assert lines[1:3] == ["i n", "t h"]
    assert len(lines) >= 1 + 49152 - 256 - 2


def test_the_vocabulary_built_from_the_asset_has_clips_ids(tmp_path: Path) -> None:
    from embedding_trainer.tools.clip_vocab import write_tokenizer_files

    folder = write_tokenizer_files(tmp_path)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert [vocab[t] for t in ("a</w>", "photo</w>", "of</w>", "*</w>", "!")] == [320, 1125, 539, 265, 0]
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


def test_pyproject_declares_the_package_data() -> None:
    tomllib = pytest.importorskip("tomllib")
    pyproject = PACKAGE.parent / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not running from a source checkout")
    patterns = tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["setuptools"]["package-data"]
    matched = {
        p.relative_to(PACKAGE).as_posix() for pattern in patterns["embedding_trainer"] for p in PACKAGE.glob(pattern)
    }
    expected = {f"templates/{t}.txt" for t in TEMPLATES} | {"tools/assets/clip_bpe_16e6.txt.gz"}
    assert expected <= matched


HOST_MODULE = re.compile(r"(modules|modules_forge|backend)\.")


def _imported_top_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and HOST_MODULE.match(node.value):
            names.add(node.value.split(".")[0])  # importlib.import_module("modules.x")
    return names


def test_only_the_import_site_touches_the_webuis_modules() -> None:
    # One module imports every host symbol (A1111's modules, Forge's backend), so a moved symbol breaks in one place
    # with a clear message.
    host_packages = {"modules", "modules_forge", "backend"}
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if host_packages & _imported_top_modules(path) and path.name != "host_symbols.py"
    ]
    assert offenders == []
    assert {"modules", "backend"} <= _imported_top_modules(PACKAGE / "webui" / "host_symbols.py")
