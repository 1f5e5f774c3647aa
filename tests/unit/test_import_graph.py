"""The package's import graph: no circles between modules, and dependencies that run one way.

Front ends (``standalone``, ``webui``) -> ``toyworld`` / ``tools`` / ``hosts`` -> the core (the modules directly in
``embedding_trainer/`` and the ``trainer`` package). The graph is read from the source with ``ast``: every import,
at module level or inside a function, relative or absolute, that names a module of ``embedding_trainer``. A
function-local import still makes a circle (it only hides it until the function runs), so it counts the same.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import embedding_trainer

pytestmark = pytest.mark.compat

PACKAGE = Path(embedding_trainer.__file__).parent
#: Packages that belong to the core although they are folders (the trainer, split into a package).
CORE_PACKAGES = {"trainer"}
#: Which layers each layer may import (its own included).
ALLOWED = {
    "core": {"core"},
    "hosts": {"core", "hosts"},
    "tools": {"core", "hosts", "tools"},
    "toyworld": {"core", "hosts", "tools", "toyworld"},
    "webui": {"core", "hosts", "webui"},
    "standalone": {"core", "hosts", "tools", "toyworld", "standalone"},
}
#: ``python -m embedding_trainer`` hands over to the command line and does nothing else.
MAIN_MAY_IMPORT = {"standalone.cli"}


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted and relative to the package root ("standalone.cli"; "" is the root)
    target: str  # imported module, the same way
    where: str  # "standalone/cli.py:22"
    text: str  # the statement as written, for the failure message

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


def module_files(root: Path) -> dict[str, Path]:
    """Every module under ``root`` by its dotted name relative to it (a package by its ``__init__.py``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _statement(node: ast.Import | ast.ImportFrom) -> str:
    names = ", ".join(a.name for a in node.names)
    if isinstance(node, ast.Import):
        return f"import {names}"
    return f"from {'.' * node.level}{node.module or ''} import {names}"


def imports_of(name: str, path: Path, root: Path, package: str, modules: dict[str, Path]) -> list[Import]:
    """The modules of the package that ``name`` (at ``path``) imports, each once per statement and target."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = name.split(".") if name else []
    # The package a relative import starts from: the module's own package (itself, for an __init__.py).
    base = here if path.name == "__init__.py" else here[:-1]
    found: list[Import] = []
    seen: set[tuple[str, int]] = set()

    def inside(dotted: str) -> str | None:
        """``dotted`` (absolute) relative to the package root, or None when it is outside the package."""
        if dotted == package:
            return ""
        return dotted[len(package) + 1 :] if dotted.startswith(package + ".") else None

    def add(node: ast.Import | ast.ImportFrom, target: str) -> None:
        if (target, node.lineno) in seen:  # "from .x import a, b": one import of x
            return
        seen.add((target, node.lineno))
        found.append(Import(name, target, f"{path.relative_to(root).as_posix()}:{node.lineno}", _statement(node)))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = inside(alias.name)
                if target is not None:
                    add(node, target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                start = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                origin = ".".join([*start, *(node.module or "").split(".")]).strip(".")
            else:
                origin = inside(node.module or "")
                if origin is None:
                    continue
            for alias in node.names:
                # "from pkg import module" imports that module; "from module import name" imports the module.
                submodule = f"{origin}.{alias.name}".lstrip(".")
                add(node, submodule if submodule in modules else origin)
    return found


def import_graph(root: Path, package: str) -> list[Import]:
    modules = module_files(root)
    return [i for name, path in modules.items() for i in imports_of(name, path, root, package, modules)]


def layer_of(module: str) -> str:
    first = module.split(".")[0]
    if module == "__main__":
        return "__main__"
    if "." not in module or first in CORE_PACKAGES:
        return "core"  # a module directly in the package, the root itself, or a core package's module
    return first


def find_cycle(imports: list[Import]) -> list[Import]:
    """One circle of imports (each edge as written), or [] when the graph has none."""
    edges: dict[str, list[Import]] = {}
    for i in imports:
        if i.target != i.source:
            edges.setdefault(i.source, []).append(i)
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[Import] = []

    def visit(module: str) -> list[Import]:
        state[module] = "open"
        for edge in edges.get(module, []):
            if state.get(edge.target) == "open":
                start = next((n for n, e in enumerate(path) if e.source == edge.target), len(path))
                return [*path[start:], edge]
            if edge.target not in state:
                path.append(edge)
                cycle = visit(edge.target)
                if cycle:
                    return cycle
                path.pop()
        state[module] = "done"
        return []

    for module in sorted(edges):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return []


def layer_problems(imports: list[Import]) -> list[str]:
    problems = []
    for i in imports:
        source, target = layer_of(i.source), layer_of(i.target)
        if source == "__main__":
            if i.target not in MAIN_MAY_IMPORT:
                problems.append(f"{i}: __main__ may import only {', '.join(sorted(MAIN_MAY_IMPORT))}")
        elif source not in ALLOWED:
            problems.append(f"{i}: {source}/ is in no layer; add it to ALLOWED in {Path(__file__).name}")
        elif target not in ALLOWED[source]:
            may = ", ".join(sorted(ALLOWED[source]))
            problems.append(f"{i}: {source} may not import {target} (it may import {may})")
    return problems


@pytest.fixture(scope="module")
def graph() -> list[Import]:
    return import_graph(PACKAGE, "embedding_trainer")


def test_the_graph_sees_the_imports_it_must_check(graph: list[Import]) -> None:
    # If the reader silently missed a kind of import, the other tests would pass on an empty graph.
    pairs = {(i.source, i.target) for i in graph}
    assert ("__main__", "standalone.cli") in pairs  # relative, module level
    assert ("standalone.cli", "standalone.driver") in pairs  # a sibling
    assert ("standalone.cli", "standalone.job_files") in pairs  # inside a function
    assert ("standalone.cli", "toyworld.world") in pairs  # two levels up and down again
    assert ("webui.tab", "hosts.forge") in pairs  # "from ..hosts import forge"
    assert any(layer_of(t) == "core" for s, t in pairs if s == "webui.run_manager")


def test_no_module_imports_itself_back_through_others(graph: list[Import]) -> None:
    cycle = find_cycle(graph)
    assert not cycle, "import circle:\n  " + "\n  ".join(map(str, cycle))


def test_dependencies_run_from_the_front_ends_down_to_the_core(graph: list[Import]) -> None:
    problems = layer_problems(graph)
    assert not problems, "imports against the layers:\n  " + "\n  ".join(problems)


def test_every_subpackage_has_a_layer() -> None:
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} - CORE_PACKAGES
    assert subpackages <= set(ALLOWED), f"new subpackages without a layer: {sorted(subpackages - set(ALLOWED))}"


def test_the_checks_name_circles_and_layer_breaches(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    files = {
        "__init__.py": "",
        "__main__.py": "from .standalone.cli import main\nfrom .config import x\n",
        "config.py": "from pkg.hosts.a import y\n",  # the core reaching up
        "trainer/__init__.py": "from .loop import run\n",
        "trainer/loop.py": "from ..config import x\n",  # a core package may use the core
        "hosts/__init__.py": "",
        "hosts/a.py": "def f():\n    from ..standalone import cli\n",  # hidden in a function: still a breach
        "standalone/__init__.py": "",
        "standalone/cli.py": "from . import jobs\nimport os\n",
        "standalone/jobs.py": "def g():\n    from .cli import main\n",  # a circle through a function-local import
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    graph = import_graph(root, "pkg")
    cycle = [str(i) for i in find_cycle(graph)]
    assert sorted(cycle) == ["standalone/cli.py:1: from . import jobs", "standalone/jobs.py:2: from .cli import main"]
    assert layer_problems(graph) == [
        "__main__.py:2: from .config import x: __main__ may import only standalone.cli",
        "config.py:1: from pkg.hosts.a import y: core may not import hosts (it may import core)",
        "hosts/a.py:2: from ..standalone import cli: hosts may not import standalone (it may import core, hosts)",
    ]
    assert layer_of("trainer.loop") == "core" and layer_of("trainer") == "core"
