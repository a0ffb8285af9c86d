"""Layers, lowest first: data_prep → layout → modeling → pipeline → train → infer → eval → bench → demo → cli.

comet_ds trains on what data_prep writes, so comet_ds may import data_prep and data_prep never imports
comet_ds; inside comet_ds a module imports its own layer and the layers below it, never one above,
not even inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# lowest first; a module's layer is its top-level package, or its subpackage/module of comet_ds
LAYERS = [
    {"data_prep"},
    {"comet_ds", "comet_ds.config", "comet_ds.configs", "comet_ds.resources", "comet_ds.schedule",
     "comet_ds.argtypes"},
    {"comet_ds.layout"},
    {"comet_ds.modeling"},
    {"comet_ds.pipeline"},
    {"comet_ds.train"},
    {"comet_ds.infer"},
    {"comet_ds.eval"},
    {"comet_ds.bench"},
    {"comet_ds.demo"},
    {"comet_ds.cli", "comet_ds.__main__"},
]


def layer_of(module: str) -> int | None:
    """The index in LAYERS of a module of this project; None for any other module."""
    package, _, rest = module.partition(".")
    if package not in ("comet_ds", "data_prep"):
        return None
    key = package if package == "data_prep" or not rest else f"comet_ds.{rest.partition('.')[0]}"
    found = [index for index, layer in enumerate(LAYERS) if key in layer]
    assert found, f"{module} belongs to no layer: add {key} to LAYERS in {Path(__file__).name}"
    return found[0]


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


def climbing_imports(root: Path) -> list[str]:
    climbing = []
    for path in sorted(list((root / "data_prep").rglob("*.py")) + list((root / "comet_ds").rglob("*.py"))):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        own = layer_of(module)
        for name in sorted(imported_modules(path)):
            target = layer_of(name)
            if target is not None and target > own:
                climbing.append(f"{path.relative_to(root)} imports {name}")
    return climbing


def test_no_import_climbs_a_layer():
    assert climbing_imports(REPO) == [], "move what the lower layer needs down into it (see LAYERS)"


def test_a_climbing_import_is_caught(tmp_path):
    for name, text in [("data_prep/cli.py", "def main():\n    from comet_ds.config import CometConfig\n"),
                       ("comet_ds/modeling/base.py", "from comet_ds.train.optim import build_optimizer\n"),
                       ("comet_ds/train/loop.py", "from comet_ds.modeling import model\nfrom data_prep import fs\n")]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert climbing_imports(tmp_path) == ["comet_ds/modeling/base.py imports comet_ds.train.optim",
                                          "data_prep/cli.py imports comet_ds.config"]
