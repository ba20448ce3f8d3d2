"""Generated bad input: every row is either a clean sample or a malformed row with a reason naming
file:line, never an exception; clean samples render within max_length. 1,200+ generated rows per run."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from deepspec.data.chat import render_sample
from deepspec.data.sources import MalformedRow, RawRow, Sample, parse_row

JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30))
JSON = st.recursive(JSON_SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
ROLE = st.one_of(st.sampled_from(["user", "assistant", "system", "human", "gpt", "bot", "model", "tool", "", "USER"]), JSON)
TURN = st.fixed_dictionaries({}, optional={"role": ROLE, "from": ROLE, "content": JSON | st.text(max_size=3000),
                                           "value": JSON})
ROW = st.one_of(
    st.fixed_dictionaries({}, optional={"conversations": st.lists(TURN, max_size=5) | JSON, "messages": st.lists(TURN, max_size=3),
                                        "turns": st.lists(st.text(max_size=50) | JSON, max_size=4) | JSON,
                                        "text": st.text(max_size=200) | JSON, "id": JSON}),
    JSON)
LINE = st.one_of(ROW.map(json.dumps), st.binary(max_size=200).map(lambda b: b.decode("utf-8", errors="replace")),
                 ROW.map(lambda r: json.dumps(r)[:-1]), st.text(max_size=100))


def check(payload, tokenizer) -> None:
    out = parse_row(RawRow(7, "rows.jsonl", 8, payload))
    assert isinstance(out, (Sample, MalformedRow))
    if isinstance(out, MalformedRow):
        assert str(out).startswith("rows.jsonl:8: ") and out.reason
        return
    assert (out.messages is None) != (out.text is None) and out.source == "rows.jsonl:8"
    if out.messages is not None:
        assert all(m["role"] in ("user", "assistant", "system") and isinstance(m["content"], str) for m in out.messages)
    rendered = render_sample(tokenizer, out, max_length=64)
    assert len(rendered.input_ids) <= 64 and len(rendered.loss_mask) == len(rendered.input_ids)


@pytest.fixture(scope="module")
def tokenizer():
    from deepspec.config.data import TargetConfig
    from deepspec.target import load_tokenizer

    return load_tokenizer(TargetConfig(name_or_path="toy"))


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(line=LINE)
def test_generated_jsonl_lines_never_raise(tokenizer, line):
    check(line, tokenizer)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(row=ROW)
def test_generated_parquet_records_never_raise(tokenizer, row):
    check(row, tokenizer)  # Parquet/datasets rows arrive as Python objects, not text


@pytest.mark.parametrize("payload,reason", [
    ('{"conversations": [{"role": ["user"], "content": "x"}]}', "turn 0 has unknown role ['user']"),
    ('{"conversations": [{"role": {"a": 1}, "content": "x"}]}', "turn 0 has unknown role {'a': 1}"),
    ('{"turns": ["a", ""]}', "'turns' must be a non-empty list of non-empty strings"),
    ('{"conversations": [{"role": "assistant", "content": ""}, {"role": "user", "content": ""}]}',
     "turn 0 is an assistant turn: a conversation starts with a user or system turn"),
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"text": "abc"', "invalid JSON"),
])
def test_bad_rows_say_what_is_wrong(payload, reason):
    out = parse_row(RawRow(0, "f.jsonl", 3, payload))
    assert isinstance(out, MalformedRow) and reason in out.reason, out


GOOD_ROW = st.tuples(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40)).map(
    lambda qa: {"conversations": [{"role": "user", "content": qa[0]}, {"role": "assistant", "content": qa[1]}]})
LINE_BYTES = st.one_of(
    GOOD_ROW.map(lambda r: ("row", r, json.dumps(r, ensure_ascii=False).encode())),  # raw U+2028, \r-free JSON, emoji...
    GOOD_ROW.map(lambda r: ("row", r, json.dumps(r).replace(", ", ",\r ").encode())),  # \r as JSON whitespace
    st.binary(min_size=1, max_size=60).filter(lambda b: b"\n" not in b).map(lambda b: ("bytes", None, b)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINE_BYTES, min_size=1, max_size=8), bom=st.booleans())
@example(lines=[("bytes", None, b"\x1c"), ("bytes", None, b"caf\xe9")], bom=True)  # a str-whitespace line; Latin-1
def test_a_jsonl_file_of_any_bytes_reads_row_for_line(tmp_path_factory, lines, bom):
    """Whatever bytes a JSONL file holds: one row per non-blank line, numbered by its line; a line that is not UTF-8 is a
    malformed row saying so (never text with U+FFFD put in); a good row parses to what was written, wherever it sits."""
    from deepspec.config.data import InputConfig
    from deepspec.data.sources import iter_raw_rows

    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + b"\n".join(line for _, _, line in lines) + b"\n")
    rows = {raw.line: parse_row(raw) for raw in iter_raw_rows(InputConfig(paths=[str(path)]))}
    for number, (kind, written, data) in enumerate(lines, start=1):
        try:
            blank = not data.decode("utf-8").strip()  # str.strip also drops U+001C-U+001F, U+0085: blank lines are skipped
        except UnicodeDecodeError:
            blank = False
        if blank:
            assert number not in rows
            continue
        out = rows[number]
        if kind == "row":
            assert isinstance(out, Sample) and out.messages == written["conversations"], (data, out)
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            assert isinstance(out, MalformedRow) and "not valid UTF-8" in out.reason, out
            continue
        assert isinstance(out, MalformedRow) or "\ufffd" not in "".join(m["content"] for m in out.messages or [])
