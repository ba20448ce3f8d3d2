"""The house's arrows point one way: lower layers (drafters, decoding, calibration) never import
higher ones (evaluation, training), and the library never imports a stage folder."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "deepspec"
FORBIDDEN = {
    "drafters": ("deepspec.decoding", "deepspec.evaluation", "deepspec.training"),
    "decoding": ("deepspec.evaluation", "deepspec.training"),
    "calibration.py": ("deepspec.decoding", "deepspec.evaluation", "deepspec.training"),
}


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_lower_layers_do_not_import_higher_ones(part):
    files = [LIB / part] if part.endswith(".py") else sorted((LIB / part).rglob("*.py"))
    bad = {f"{f.relative_to(LIB)}: {m}" for f in files for m in imports(f) if m.startswith(FORBIDDEN[part])}
    assert not bad, bad


def test_the_library_never_imports_a_stage_folder():
    bad = {f"{f.relative_to(LIB)}: {m}" for f in LIB.rglob("*.py") for m in imports(f) if m.split(".")[0] in ("data", "train", "eval")}
    assert not bad, bad
