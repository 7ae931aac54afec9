"""The package's dependencies point one way: each top-level part imports only parts of a lower layer (or leaf
utilities). Read from the source with ``ast``, lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "opentrans"

#: Leaf utilities anyone may import; they import no other part of the package but each other.
LEAVES = {"errors", "artifacts", "options", "registry", "timing", "hardware", "validate", "progress", "runtime",
          "__init__"}
#: Layer of every other top-level module or subpackage (lower = more basic).
LAYERS = {"data": 1, "metrics": 1, "models": 2, "inference": 3, "analyze": 3, "prune": 4, "finetune": 4,
          "deploy": 4, "bench": 5, "recipe": 6, "pipeline": 7, "api": 7, "cli": 8}


def _part(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_parts(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("opentrans."):
                parts.add(name.split(".")[1])
    return parts


def test_every_part_has_a_layer():
    found = {_part(p) for p in PACKAGE.rglob("*.py")}
    assert found - LEAVES - set(LAYERS) == set(), "give a new part of the package a layer here"


def test_dependencies_point_down():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = _part(path)
        for dst in _imported_parts(path) - {src}:
            if dst in LEAVES:
                continue
            if src in LEAVES or LAYERS[dst] >= LAYERS[src]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports opentrans.{dst}")
    assert wrong == []


def test_the_check_sees_a_wrong_import(tmp_path):
    """The import reader finds lazy imports inside functions (what a cycle usually hides behind)."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from opentrans.cli import cli\n    import opentrans.bench.stage\n")
    assert _imported_parts(module) == {"cli", "bench"}


def test_building_the_cli_loads_no_torch():
    """``opentrans --help`` stays fast: the CLI's registry-backed choices and the stage packages load their plug-ins
    and torch only when a command needs them."""
    import subprocess
    import sys

    code = "import sys, opentrans.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent).returncode == 0
