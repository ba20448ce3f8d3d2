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


def qwen3_5_layer_types(n: int) -> list[str]:
    """Qwen3.5's pattern (full_attention_interval 4, cited for every size in the fixture's source): layers 3, 7, ... attend."""
    return ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)]


def test_full_attention_selection_of_the_27b_preset_is_specforges_dflash_recipe():
    """target.layer_selection=full_attention on qwen3_5_27b gives 3, 15, 31, 47, 59: the target layers of SpecForge's
    Qwen3.5-27B DFlash config (configs/qwen3.5-27b-dflash.json @5a9fcf26, sgl-project/SpecForge PR 573), written there
    by hand; here derived from the evenly spaced preset by moving each id to the nearest full-attention layer."""
    from deepspec.config.data import nearest_full_attention

    values, _ = preset("qwen3_5_27b")
    assert nearest_full_attention(values["layer_ids"], qwen3_5_layer_types(64)) == [3, 15, 31, 47, 59]
    for name in [n for n in PRESETS if n.startswith("qwen3_5_")]:  # every Qwen3.5 preset has a valid selection
        ids = nearest_full_attention(preset(name)[0]["layer_ids"], qwen3_5_layer_types(PUBLIC[name]["num_hidden_layers"]))
        assert all((i + 1) % 4 == 0 and i < PUBLIC[name]["num_hidden_layers"] - 1 for i in ids), (name, ids)


def test_layer_selection_is_resolved_at_start_up_from_the_targets_config(tmp_path):
    """The stage config resolves layer_ids from the target's config.json (no weights), and a selection that would
    repeat a layer is a start-up error that names the key."""
    from transformers import Qwen3_5TextConfig

    from deepspec.config import ConfigError, DataStageConfig, to_dataclass
    from omegaconf import OmegaConf

    Qwen3_5TextConfig(num_hidden_layers=16).save_pretrained(tmp_path)  # full attention at 3, 7, 11, 15
    cfg = lambda ids: OmegaConf.create({"input": {"paths": ["x.jsonl"]}, "target": {  # noqa: E731
        "name_or_path": str(tmp_path), "layer_ids": ids, "layer_selection": "full_attention"}})
    assert to_dataclass(cfg([1, 6, 12]), DataStageConfig).target.layer_ids == [3, 7, 11]
    assert to_dataclass(cfg([5, 9, 14]), DataStageConfig).target.layer_ids == [3, 7, 11]  # ties go down; never the last layer
    with pytest.raises(ConfigError, match="layer_selection=full_attention.*repeats a layer"):
        to_dataclass(cfg([1, 2, 12]), DataStageConfig)
