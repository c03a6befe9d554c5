"""The layering of docs/architecture.md, checked on the source: CLI -> services -> shared.

Imports are read with ``ast`` (every ``import`` statement, also those inside functions, since a
lazy import is still a dependency); only imports under ``if TYPE_CHECKING:`` are left out of the
cycle check, as they never run.  Every module must also import for real, and every package folder
must be listed in pyproject's ``packages`` (else an installed copy would lack it).
"""

from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Repository folder -> import package (pyproject's package-dir).
LAYERS = {"shared": "buildtel.shared", "services": "buildtel.services", "cli": "buildtel.cli"}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's __init__)."""
    mods: dict[str, tuple[Path, bool]] = {}
    for folder, package in LAYERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts.pop()
            mods[".".join([package, *parts])] = (path, is_pkg)
    return mods


MODULES = _modules()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the statements inside ``if TYPE_CHECKING:`` blocks."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (
                (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
                or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")):
            for stmt in node.body:
                out.update(id(n) for n in ast.walk(stmt))
    return out


def _imports(name: str) -> list[tuple[str, int, bool]]:
    """(imported buildtel module, line, only for type checking) for every import in ``name``."""
    path, is_pkg = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    typing_only = _type_checking_nodes(tree)
    found: list[tuple[str, int, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import mod` depends on pkg.mod when that is a module
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names]
        else:
            continue
        found += [(t, node.lineno, id(node) in typing_only) for t in targets if t.split(".")[0] == "buildtel"]
    return found


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_modules_found() -> None:
    assert len(MODULES) > 100, "the scan found too few modules: has the layout moved?"
    for layer in ("shared", "services", "cli"):
        assert any(_layer(m) == layer for m in MODULES), layer


@pytest.mark.parametrize("name", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_nothing_in_shared_imports_services_or_cli() -> None:
    bad = [f"{MODULES[m][0].relative_to(ROOT)}:{line} imports {t}"
           for m in MODULES if _layer(m) == "shared"
           for t, line, _ in _imports(m) if _layer(t) in ("services", "cli")]
    assert not bad, "shared/ is the bottom layer (docs/architecture.md):\n" + "\n".join(bad)


def test_nothing_in_services_imports_cli() -> None:
    bad = [f"{MODULES[m][0].relative_to(ROOT)}:{line} imports {t}"
           for m in MODULES if _layer(m) == "services"
           for t, line, _ in _imports(m) if _layer(t) == "cli"]
    assert not bad, "services/ never import the CLI (docs/architecture.md):\n" + "\n".join(bad)


# What the CLI may import from services/: each service's public modules (docs/architecture.md
# "Public modules of the services"), never a service.py or other internals.
PUBLIC_SERVICE_MODULES = {
    "buildtel.services.registry",  # name -> service class, serve options
    "buildtel.services.storage.api",  # StorageClient and its wire messages
    "buildtel.services.storage.tests_history",  # per-test figures, flaky tests: clients and messages
    "buildtel.services.storage.failures",  # failures grouped by signature and class: client and messages
    "buildtel.services.storage.rebalance",  # offline change of the partition count (buildtel storage)
    "buildtel.services.analyzer.api",  # AnalyzerClient and its wire messages
    "buildtel.services.analyzer.alerts",  # the alert message and its decoder
    "buildtel.services.analyzer.analytics",  # reports computed from sessions (also offline)
    "buildtel.services.analyzer.export",  # report export formats
    "buildtel.services.notifier.api",  # the subscriptions file and delivery counts
    "buildtel.services.tracer.query",  # TraceClient
    "buildtel.services.tracer.subjects",
    "buildtel.services.tracer.exporters",  # span exporters (OTLP, Zipkin)
    "buildtel.services.tracer.testpoint",
    "buildtel.services.tracer.options",  # the tracer's serve options (through the registry)
}


def test_cli_imports_only_the_public_modules_of_services() -> None:
    bad = [f"{MODULES[m][0].relative_to(ROOT)}:{line} imports {t}"
           for m in MODULES if _layer(m) == "cli"
           for t, line, _ in _imports(m) if _layer(t) == "services" and t not in PUBLIC_SERVICE_MODULES]
    assert not bad, ("the CLI talks to services only through their public modules (docs/architecture.md):\n"
                     + "\n".join(bad))
    assert set(MODULES) >= PUBLIC_SERVICE_MODULES, "a listed public module does not exist"


def test_no_import_cycles() -> None:
    graph = {m: sorted({t for t, _, typing_only in _imports(m) if t in MODULES and t != m and not typing_only})
             for m in MODULES}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                cycles.append([*path[path.index(t):], t])
            elif t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles (move what both need into a third module):\n" + "\n".join(
        " -> ".join(c) for c in cycles)


def test_cycle_check_sees_a_cycle() -> None:
    """The checker itself: a lazy import inside a function counts, TYPE_CHECKING does not."""
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import buildtel.a\n"
                     "def f():\n    import buildtel.b\n")
    typing_only = _type_checking_nodes(tree)
    flags = {n.names[0].name: id(n) in typing_only for n in ast.walk(tree)
             if isinstance(n, ast.Import) and n.names[0].name.startswith("buildtel")}
    assert flags == {"buildtel.a": True, "buildtel.b": False}


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {m for m, (_, is_pkg) in MODULES.items() if is_pkg}
    assert folders - listed == set(), "package folders missing from pyproject's packages"
    assert listed - folders == set(), "pyproject lists packages that do not exist"
    for folder in LAYERS:
        for d in (ROOT / folder).rglob("*"):
            if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py")):
                assert (d / "__init__.py").exists(), f"{d.relative_to(ROOT)} has modules but no __init__.py"
