"""The layout's rules (docs/architecture.md), read from the import statements of every module."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gradsift"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> tuple[set[str], set[str]]:
    """(imported at module level, imported anywhere) gradsift modules of one module."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    top: set[str] = set()
    everywhere: set[str] = set()

    def target(base: str, alias: str) -> str:
        full = f"{base}.{alias}"
        return full if full in MODULES else base

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            level = module_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            found: list[str] = []
            if isinstance(child, ast.Import):
                found = [a.name for a in child.names if a.name.split(".")[0] == "gradsift"]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] == "gradsift":
                    found = [target(base, a.name) for a in child.names]
            everywhere.update(found)
            if level:
                top.update(found)
            visit(child, level)

    visit(ast.parse(path.read_text(encoding="utf-8")), True)
    return top, everywhere


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


COMMANDS = "commands"  # the command modules (cli, pipeline, */*commands.py): the top floor


def _floor(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("cli", "pipeline", "__main__") or parts[-1].endswith("commands"):
        return COMMANDS
    return parts[1]


def test_no_module_level_import_circle():
    graph = {m: {t for t in top if t in MODULES and t != m} for m, (top, _) in GRAPH.items()}
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the path, 2 done
    path: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state[t] == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            if state[t] == 0:
                walk(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if state[m] == 0:
            walk(m)


# floor -> the floors it may import from, lazy imports included (docs/architecture.md)
_BASE = {"runtime", "configs", "data"}
ALLOWED = {
    "runtime": set(),
    "configs": set(),
    "data": set(),
    "tasks": {"data"},
    "models": set(),
    "losses": set(),
    "store": {"data"},
    "norms": {"data", "losses"},
    "select": {"data"},
    "scoring": _BASE | {"norms", "losses"},
    "eval": _BASE | {"tasks", "models", "losses", "store"},
    "train": _BASE | {"tasks", "models", "losses", "store", "norms", "select", "eval"},
    "organisms": _BASE | {"tasks", "models", "losses", "store", "eval", "train"},
}
ALLOWED["testing"] = {"norms", "losses", "data"}  # tools that test gradsift; the pipeline never imports them
ALLOWED["analysis"] = set(ALLOWED) - {"testing"} | {"scoring", "organisms"}
ALLOWED["report"] = ALLOWED["analysis"] | {"analysis"}


def test_every_module_has_a_floor():
    floors = set(ALLOWED) | {COMMANDS}
    assert not sorted(m for m in MODULES if _floor(m) not in floors), "add the new floor to ALLOWED"


@pytest.mark.parametrize("floor", sorted(ALLOWED))
def test_a_floor_imports_only_from_below(floor):
    wrong = sorted(
        f"{m} -> {t}"
        for m, (_, everywhere) in GRAPH.items() if _floor(m) == floor
        for t in everywhere if _floor(t) not in ALLOWED[floor] | {floor}
    )
    assert not wrong, "imports from a floor above: " + ", ".join(wrong)


def test_nothing_below_the_organisms_imports_them():
    users = sorted(m for m, (_, everywhere) in GRAPH.items()
                   if _floor(m) in {"data", "tasks", "models", "losses", "norms", "select", "eval", "train", "store"}
                   and any(_floor(t) == "organisms" for t in everywhere))
    assert not users, f"{users} import gradsift.organisms (models.py finds them through the registry)"


def test_the_pipeline_does_not_import_the_test_tools():
    users = sorted(m for m, (_, everywhere) in GRAPH.items()
                   if _floor(m) != "testing" and any(_floor(t) == "testing" for t in everywhere))
    assert not users, users


def test_the_run_directory_store_names_files_and_interprets_nothing():
    _, everywhere = GRAPH["gradsift.store"]
    assert {_floor(t) for t in everywhere} <= {"data"}, sorted(everywhere)
