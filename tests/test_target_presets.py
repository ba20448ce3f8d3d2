"""Every real-model preset under configs/target agrees with its model's public config.json, as recorded (with
the repo, path and commit each value was read from) in tests/fixtures/public_target_configs.json."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from deepspec.config import CONFIG_DIR

FIXTURE = Path(__file__).parent / "fixtures" / "public_target_configs.json"
PUBLIC = {k: v for k, v in json.loads(FIXTURE.read_text()).items() if not k.startswith("_")}
PRESETS = sorted(p.stem for p in (CONFIG_DIR / "target").glob("*.yaml") if p.stem not in ("toy", "target_schema"))
CITED_FIELDS = ("num_hidden_layers", "hidden_size", "vocab_size", "mask_token")


def preset(name: str) -> tuple[dict, str]:
    path = CONFIG_DIR / "target" / f"{name}.yaml"
    return yaml.safe_load(path.read_text()), path.read_text()


def stated(pattern: str, text: str, name: str) -> int:
    """A number the preset's header comment states (its layer count, hidden size)."""
    comment = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    m = re.search(pattern, comment)
    assert m, f"configs/target/{name}.yaml: the comment does not state {pattern!r}"
    return int(m.group(1))


def test_every_preset_has_public_values_and_no_stale_entries():
    assert PRESETS, "no real-model presets found"
    assert sorted(PUBLIC) == PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_preset_matches_public_config(name):
    values, text = preset(name)
    public = PUBLIC[name]
    n = public["num_hidden_layers"]
    ids = values["layer_ids"]
    assert values["name_or_path"] == public["model_id"], name
    assert all(-1 <= i < n for i in ids), (name, ids, n)
    assert all(a < b for a, b in zip(ids, ids[1:])), f"{name}: layer_ids must be strictly increasing: {ids}"
    # The last layer's output is the final hidden state the LM head reads; a drafter gains nothing from it.
    assert ids[-1] < n - 1, f"{name}: last layer id {ids[-1]} is the final layer ({n - 1})"
    assert values["mask_token_id"] == public["mask_token_id"], name
    assert 0 <= values["mask_token_id"] < public["vocab_size"], name
    assert stated(r"(\d+)[ -]layers?\b", text, name) == n, name
    assert stated(r"hidden (\d+)", text, name) == public["hidden_size"], name


@pytest.mark.parametrize("name", PRESETS)
def test_public_values_are_cited(name):
    citations = PUBLIC[name]["citations"]
    for field in CITED_FIELDS:
        assert citations.get(field), f"{name}: no citation for {field}"
        for cite in citations[field]:
            assert cite["repo"].count("/") == 1 and cite["path"] and cite["says"], (name, field, cite)
            assert re.fullmatch(r"[0-9a-f]{40}", cite["commit"]), (name, field, cite["commit"])


def test_docs_table_lists_every_preset():
    """docs/targets.md shows each preset's model id, shape and layer ids as the preset and fixture have them."""
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", r)[1:-1]]  # "\|" is a pipe inside a cell
            for r in (Path(__file__).parents[1] / "docs" / "targets.md").read_text().splitlines() if r.startswith("| `")]
    table = {r[0].strip("`"): r[1:] for r in rows}
    for name in PRESETS:
        values, public = preset(name)[0], PUBLIC[name]
        cells = table[name]
        expected = [public["model_id"], str(public["num_hidden_layers"]), str(public["hidden_size"]),
                    str(public["vocab_size"]), ", ".join(map(str, values["layer_ids"]))]
        assert cells[:5] == expected, (name, cells[:5], expected)
        assert f"({values['mask_token_id']})" in cells[5], (name, cells[5])
