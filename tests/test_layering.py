"""No two modules in service/ import each other (issue 34).

Every import counts: at the top of a module, inside a function (a lazy import), and under
`if TYPE_CHECKING:` (an annotation-only import still ties the two modules together). A package's
`__init__.py` is the module `service.x.y`. A target is the longest service module its dotted name
starts with; `from pkg import name` targets `pkg.name` when that is a module, else `pkg`.
service/_generated (protoc's output) is left out.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"_generated"}


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `root` (the package `package`)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if SKIP.intersection(parts[:-1]):
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join((package, *parts))] = path
    return found


def _targets(node: ast.Import | ast.ImportFrom, package: str, known: dict[str, Path]) -> list[str]:
    """The dotted names one import statement reaches (`package`: the package relative imports start from)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = package.split(".")
        if node.level > 1:
            base = base[: len(base) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    return [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source for alias in node.names]


def _owner(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module `name` starts with (None: outside the package)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (anywhere in its file), itself left out."""
    known = modules(root, package)
    graph = {}
    for name, path in known.items():
        parent = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, parent, known):
                    owner = _owner(target, known)
                    if owner and owner != name:
                        deps.add(owner)
        graph[name] = deps
    return graph


def mutual_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return [(a, b) for a, b in itertools.combinations(sorted(graph), 2) if b in graph[a] and a in graph[b]]


def test_no_two_service_modules_import_each_other():
    graph = import_graph(ROOT / "service", "service")
    pairs = mutual_imports(graph)
    assert not pairs, "modules that import each other (break the circle: move the shared part to a third module):\n" + \
        "\n".join(f"  {a} <-> {b}" for a, b in pairs)


def test_the_graph_sees_the_imports_that_matter():
    """Guards the check above against passing vacuously: known imports of several kinds are found."""
    graph = import_graph(ROOT / "service", "service")
    assert "service._generated" not in graph and not any(m.startswith("service._generated.") for m in graph)
    assert "service.stores.migrations" in graph["service.stores.db"]  # lazy, inside open_database
    assert "service.edit.workbench.guided" in graph["service.edit.workbench.bench"]  # from . import guided
    assert "service.edit.workbench.protocol" in graph["service.edit.workbench.mask"]  # under TYPE_CHECKING
    assert "service.edit.workbench.bench" in graph["service.edit.workbench"]  # a package's __init__


def test_every_kind_of_import_counts(tmp_path):
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from .b import thing\n",  # lazy, relative, a name in b
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import f\n",
        "sub/__init__.py": "from . import c\n",  # a package's __init__ importing its submodule
        "sub/c.py": "import pkg.sub\n",
        "sub/d.py": "from .. import a\nfrom ..sub import e\n",  # level 2; `e` is not a module: pkg.sub
        "e.py": "from pkg.sub.d import x\nimport os.path\n",
        "_generated/g.py": "import pkg.a\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, "pkg")
    assert graph == {
        "pkg": set(),
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.a"},
        "pkg.sub": {"pkg.sub.c"},
        "pkg.sub.c": {"pkg.sub"},
        "pkg.sub.d": {"pkg.a", "pkg.sub"},
        "pkg.e": {"pkg.sub.d"},
    }
    assert mutual_imports(graph) == [("pkg.a", "pkg.b"), ("pkg.sub", "pkg.sub.c")]
