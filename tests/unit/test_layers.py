"""The package's layers import downwards only (DESIGN.md): read from the source, no imports run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "glm_api"


def _imports(folder: str) -> dict[str, set[str]]:
    """``glm_api`` modules each module under ``folder`` imports (TYPE_CHECKING ones included)."""
    out = {}
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("glm_api"):
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names if a.name.startswith("glm_api"))
        out[str(path.relative_to(PACKAGE.parent))] = names
    return out


@pytest.mark.parametrize(
    ("folder", "allowed"),
    [
        ("protocol", ("glm_api.protocol",)),  # wire models: nothing else of ours
        ("families", ("glm_api.families", "glm_api.units", "glm_api.errors", "glm_api.device_map")),
        ("routers", ("glm_api.routers", "glm_api.serving", "glm_api.protocol", "glm_api.deps", "glm_api.errors")),
    ],
)
def test_a_layer_imports_only_what_is_below_it(folder, allowed):
    wrong = {
        module: sorted(name for name in names if not name.startswith(allowed))
        for module, names in _imports(folder).items()
    }
    assert not {m: names for m, names in wrong.items() if names}


def test_nothing_in_engines_imports_serving_or_routers():
    for module, names in _imports("engines").items():
        assert not [n for n in names if n.startswith(("glm_api.serving", "glm_api.routers"))], module
