"""The mutation list (tests/mutations.py, run by scripts/mutation_check.py) moves with the code: every entry's
original text must occur exactly once in its file, or the check would mutate nothing (or the wrong place)."""
from __future__ import annotations

from pathlib import Path

import pytest

from mutations import MUTATIONS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,path,original,mutated,selection", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_each_mutation_names_one_place_in_the_code(name, path, original, mutated, selection):
    assert original != mutated, name
    assert (REPO / path).read_text().count(original) == 1, f"{name}: the original text is not once in {path}"
