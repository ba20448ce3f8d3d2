"""Valid but unusual text reads back exactly in every stage that reads rows: the eval's prompt sets
and the regeneration log go through line splitting that only splits at newlines."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from deepspec.config.eval import EvalDatasetConfig
from deepspec.data.regenerate import _read_done
from deepspec.evaluation.harness import load_prompts

SPECIAL = st.sampled_from(["\u2028", "\u2029", "\x00", "\x85", "\x0b", "\x0c", "\r", "\u200f", "\u202e", "\U0001F600", "\ud800"])
TEXT = st.lists(st.one_of(st.text(min_size=1, max_size=20), SPECIAL), min_size=1, max_size=12).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=st.lists(st.lists(TEXT, min_size=1, max_size=3), min_size=1, max_size=5), ascii_only=st.booleans())
def test_eval_prompt_rows_read_back_exactly(tmp_path_factory, turns, ascii_only):
    # a lone surrogate is valid JSON only escaped ("\ud800"); written raw it would not be UTF-8 at all
    assume(ascii_only or not any("\ud800" in t for turn in turns for t in turn))
    path = tmp_path_factory.mktemp("prompts") / "set.jsonl"
    path.write_text("".join(json.dumps({"turns": t}, ensure_ascii=ascii_only) + "\n" for t in turns), encoding="utf-8")
    assert load_prompts(EvalDatasetConfig(name="x", path=str(path), max_prompts=100, shuffle=False), 0) == turns


def test_a_bad_eval_row_is_named_by_line(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text('{"turns": ["ok"]}\n{"turns": []}\n{"turns": [3]}\n')
    with pytest.raises(ValueError, match=r"lines \[2, 3\] have no non-empty 'turns' list of strings"):
        load_prompts(EvalDatasetConfig(name="x", path=str(path), max_prompts=10), 0)
    path.write_text('{"turns": ["ok"]}\n{"turns": ["cut\n')
    with pytest.raises(ValueError, match=r"set.jsonl:2: not a JSON object"):
        load_prompts(EvalDatasetConfig(name="x", path=str(path), max_prompts=10), 0)
    path.write_bytes(b'{"turns": ["ok"]}\n{"turns": ["caf\xe9"]}\n')  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"set.jsonl:2: not valid UTF-8 \(byte 15 of the line\)"):
        load_prompts(EvalDatasetConfig(name="x", path=str(path), max_prompts=10), 0)


def test_regenerated_answers_with_line_separators_are_not_lost(tmp_path):
    done = tmp_path / "shard-000000.jsonl"
    rows = [{"id": f"r{i}", "messages": [{"role": "assistant", "content": f"a\u2028b\u2029c {i}"}]} for i in range(3)]
    done.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert _read_done(done) == {r["id"]: r["messages"] for r in rows}
