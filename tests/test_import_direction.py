"""Imports run one way between the two packages: comet_ds trains on what data_prep writes, so comet_ds
may import data_prep, and data_prep never imports comet_ds, not even inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every absolute import in a module, wherever it stands (top level or inside a function)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_data_prep_never_imports_comet_ds():
    climbing = [f"{path.relative_to(REPO)} imports {name}" for path in sorted((REPO / "data_prep").rglob("*.py"))
                for name in sorted(imported_modules(path)) if name.partition(".")[0] == "comet_ds"]
    assert climbing == [], "data_prep sits below comet_ds: move what it needs into data_prep"
