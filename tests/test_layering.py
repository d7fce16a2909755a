"""Imports go one way (docs/ARCHITECTURE.md): the core never reaches back into the repository,
and backends never import the server. Checked on the source, so a stray import fails here
before it becomes a cycle somewhere else."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(folder: Path) -> list[tuple[str, str]]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(path.relative_to(ROOT).as_posix(), alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.append((path.relative_to(ROOT).as_posix(), node.module))
    return found


def test_core_does_not_import_the_repository() -> None:
    bad = [(f, m) for f, m in _imports(ROOT / "server" / "core") if m.startswith("server.repository")]
    assert not bad, f"server/core must not import server/repository: {bad}"


def test_backends_do_not_import_the_server() -> None:
    bad = [(f, m) for f, m in _imports(ROOT / "backends") if m == "server" or m.startswith("server.")]
    assert not bad, f"backends/ must not import server/: {bad}"
