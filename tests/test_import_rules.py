"""The import rules of DESIGN.md §6: fsm, crypto, storage and log import no gRPC; nothing
imports kmsd.api except the node assembly and CLI."""

from __future__ import annotations

import ast
from pathlib import Path

KMSD = Path(__file__).resolve().parent.parent / "kmsd"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_core_packages_import_no_grpc() -> None:
    for package in ("fsm", "crypto", "storage", "log", "service"):
        for path in (KMSD / package).rglob("*.py"):
            bad = {n for n in _imports(path) if n == "grpc" or n.startswith("grpc")}
            assert not bad, f"{path} imports {bad}"


def test_only_the_assembly_imports_api() -> None:
    allowed = {KMSD / "app.py", KMSD / "cli.py"}
    for path in KMSD.rglob("*.py"):
        if path in allowed or KMSD / "api" in path.parents:
            continue
        bad = {n for n in _imports(path) if n.startswith("kmsd.api")}
        assert not bad, f"{path} imports {bad}"
