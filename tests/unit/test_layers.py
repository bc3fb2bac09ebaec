"""The layers of docs/architecture.md, read from the code's own imports.

Parsing (not importing) every module of ``src/polyray`` keeps the check cheap and independent of
optional dependencies. Each rule is a test, so a failure names the rule and the offending imports.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "polyray"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> Iterator[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


IMPORTS: dict[str, set[str]] = {_module_name(p): set(_imports(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _part(name: str) -> str | None:
    """The top-level part of ``polyray.x.y`` (``x``), or None outside polyray."""
    parts = name.split(".")
    if parts[0] != "polyray" or len(parts) < 2:
        return None
    return parts[1]


def _crossings(source_part: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for module, names in IMPORTS.items():
        if _part(module) != source_part:
            continue
        for name in names:
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                found.append(f"{module} -> {name}")
    return sorted(found)


def test_the_parser_sees_the_package() -> None:
    """Guards the other tests against passing on an empty or misread tree."""
    assert "polyray.engine.engine" in IMPORTS
    assert "polyray.backends.base" in IMPORTS["polyray.engine.engine"] or any(
        n.startswith("polyray.backends") for n in IMPORTS["polyray.engine.engine"]
    )


def test_backends_import_nothing_from_the_engine() -> None:
    assert _crossings("backends", ("polyray.engine",)) == []


def test_the_engine_imports_no_http_or_sql_library() -> None:
    assert _crossings("engine", ("fastapi", "starlette", "pydantic", "uvicorn", "sqlalchemy", "httpx")) == []


def test_errors_is_a_leaf() -> None:
    assert sorted(n for n in IMPORTS["polyray.errors"] if n.startswith("polyray")) == []


def test_observability_imports_no_tenancy() -> None:
    assert _crossings("observability", ("polyray.tenancy",)) == []


def test_no_production_module_imports_benchmark_code() -> None:
    offenders = [
        f"{module} -> {name}"
        for module, names in IMPORTS.items()
        if _part(module) not in ("benchmarks", "cli")  # the CLI launches the benches
        for name in names
        if name.startswith("polyray.benchmarks")
    ]
    assert offenders == []


def _part_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, names in IMPORTS.items():
        source = _part(module)
        if source is None or "." not in module.removeprefix("polyray."):
            continue  # top-level modules (config.py, errors.py, ...) are leaves or roots, not parts
        for name in names:
            target = _part(name)
            if target is not None and target != source and (SRC / "polyray" / target).is_dir():
                graph.setdefault(source, set()).add(target)
    return graph


def test_no_cycle_between_top_level_parts() -> None:
    graph = _part_graph()
    cycles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif len(path) < len(graph) + 1:
                visit(nxt, [*path, nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert sorted(set(cycles)) == []


@pytest.mark.parametrize("part", ["backends", "engine", "cache", "tenancy", "heads", "db", "api", "cli"])
def test_each_part_exists(part: str) -> None:
    """The rules above name these parts; a rename must update them, not silently pass."""
    assert (PACKAGE / part).is_dir()
