"""Issue 10 item 6: no import circle between the catalog and the run writer. ``runs`` owns committing a run (with
the commit-time catalog update) and imports ``catalog``; ``catalog`` (and the modules it uses) never import
``runs``: run markers are parsed by ``storage/markers.py``."""

from __future__ import annotations

import ast
from pathlib import Path

import easyroutine_dist.storage as storage_pkg
from easyroutine_dist.storage import markers, runs

STORAGE = Path(storage_pkg.__file__).parent


def _imports(module: str) -> set[str]:
    """Every storage module ``module`` imports, at any depth of its code (local imports included)."""
    out = set()
    for node in ast.walk(ast.parse((STORAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                out.update([node.module] if node.module else [a.name for a in node.names])
            elif node.module and node.module.startswith("easyroutine_dist.storage."):
                out.add(node.module.rsplit(".", 1)[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.rsplit(".", 1)[1] for a in node.names if a.name.startswith("easyroutine_dist.storage."))
    return out


def test_catalog_does_not_import_runs():
    seen, todo = set(), ["catalog"]
    while todo:  # what catalog imports, transitively, within storage
        mod = todo.pop()
        if mod in seen or not (STORAGE / f"{mod}.py").exists():
            continue
        seen.add(mod)
        todo.extend(_imports(mod))
    assert "runs" not in seen, seen
    assert "catalog" in _imports("runs")  # the commit-time update lives in runs
    assert runs.read_manifest is markers.read_manifest  # old import paths keep working
