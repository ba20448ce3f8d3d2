"""Input rows (malformed rows reported with file:line) and the loss mask of rendered conversations."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TOY_DIR, data_config, write_jsonl
from transformers import AutoTokenizer

from deepspec.config.data import InputConfig
from deepspec.data import build as build_mod
from deepspec.data.build import MalformedInputError, build_cache
from deepspec.data.cache.reader import TargetCacheDataset
from deepspec.data.chat import ChatTemplateError, render_sample
from deepspec.data.sources import MalformedRow, Sample, iter_raw_rows, parse_row


def _conv(i: int, n_words: int = 6) -> dict:
    return {"id": f"row{i}", "conversations": [
        {"role": "user", "content": f"Question number {i}: please say something."},
        {"role": "assistant", "content": " ".join(["answer"] * n_words) + f" {i}."}]}


# (line content, reason keyword or None for a good row). Line numbers are 1-based positions in this list.
JSONL_LINES = [
    (_conv(0), None),
    ('{"conversations": [{"role": "user", "content": "x"}', "invalid JSON"),
    ("[1, 2, 3]", "expected a JSON object"),
    ({"conversations": [{"role": "wizard", "content": "x"}]}, "unknown role"),
    ({"conversations": [{"role": "user"}]}, "no string 'content'"),
    ({"turns": []}, "'turns'"),
    ({"prompt": "hello", "answer": "hi"}, "no 'conversations'"),
    (_conv(1), None),
    ({"conversations": []}, "non-empty list"),
    ({"conversations": [{"role": "assistant", "content": "no user"}]}, "no user turn"),
    ({"text": ""}, "'text'"),
    ({"text": "A plain text row with enough tokens to be kept."}, None),
    ({"messages": [{"from": "human", "value": "hi there"}, {"from": "gpt", "value": "hello to you, friend"}]}, None),
    ({"turns": ["a prompt only row"]}, None),
    ('"just a string"', "expected a JSON object"),
    ({"conversations": ["not an object"]}, "turn 0 is not an object"),
]


def _write_lines(path, lines):
    """Write JSONL with a blank line after line 3 (blank lines count for numbering but are not rows)."""
    out = []
    for i, (row, _) in enumerate(lines):
        out.append(row if isinstance(row, str) else json.dumps(row))
        if i == 2:
            out.append("")
    path.write_text("\n".join(out) + "\n")
    # file line of list entry i
    return {i: i + 1 + (1 if i >= 3 else 0) for i in range(len(lines))}


def _expected_bad(path, lines, line_of):
    return {(str(path), line_of[i], why) for i, (_, why) in enumerate(lines) if why}


def test_parse_row_reports_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    line_of = _write_lines(path, JSONL_LINES)
    parsed = [parse_row(raw) for raw in iter_raw_rows(InputConfig(paths=[str(path)]))]
    assert len(parsed) == len(JSONL_LINES)
    bad = [p for p in parsed if isinstance(p, MalformedRow)]
    got = {(m.file, m.line) for m in bad}
    assert got == {(f, ln) for f, ln, _ in _expected_bad(path, JSONL_LINES, line_of)}
    for m in bad:
        i = next(i for i, ln in line_of.items() if ln == m.line)
        assert JSONL_LINES[i][1] in m.reason, (m, JSONL_LINES[i])
        assert str(m) == f"{path}:{m.line}: {m.reason}"
        assert m.index == i  # rows are numbered in order, blank lines excluded
    good = [p for p in parsed if isinstance(p, Sample)]
    assert [g.source for g in good] == [f"{path}:{line_of[i]}" for i, (_, why) in enumerate(JSONL_LINES) if not why]
    assert good[0].sample_id == "row0" and good[0].messages[1] == {"role": "assistant", "content": JSONL_LINES[0][0]["conversations"][1]["content"]}
    sharegpt = next(g for g in good if g.source.endswith(f":{line_of[12]}"))
    assert [m["role"] for m in sharegpt.messages] == ["user", "assistant"]
    prompt_only = next(g for g in good if g.source.endswith(f":{line_of[13]}"))
    assert prompt_only.needs_answers and prompt_only.messages == [{"role": "user", "content": "a prompt only row"}]
    text = next(g for g in good if g.text is not None)
    assert text.messages is None and not text.needs_answers


def test_sample_id_is_content_hash_without_id(tmp_path):
    rows = [{"text": "same"}, {"text": "same"}, {"text": "other"}]
    parsed = [parse_row(r) for r in iter_raw_rows(InputConfig(paths=[str(write_jsonl(tmp_path / "t.jsonl", rows))]))]
    assert parsed[0].sample_id == parsed[1].sample_id != parsed[2].sample_id
    assert parsed[0].source != parsed[1].source


def _parquet_rows(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


PARQUET_ROWS = [
    _conv(100),
    {"id": "pq-bad", "conversations": [{"role": "narrator", "content": "bad role"}]},
    _conv(101),
    _conv(102),
]


def test_parquet_rows_are_read_with_row_numbers(tmp_path):
    path = _parquet_rows(tmp_path / "rows.parquet", PARQUET_ROWS)
    jsonl = write_jsonl(tmp_path / "first.jsonl", [_conv(1), _conv(2)])
    parsed = [parse_row(r) for r in iter_raw_rows(InputConfig(paths=[str(jsonl), str(path)]))]
    assert [p.index for p in parsed] == list(range(6))
    assert [p.sample_id for p in parsed if isinstance(p, Sample)] == ["row1", "row2", "row100", "row101", "row102"]
    bad = [p for p in parsed if isinstance(p, MalformedRow)]
    assert [(b.file, b.line) for b in bad] == [(str(path), 2)] and "unknown role" in bad[0].reason
    s = parsed[2]
    assert s.source == f"{path}:1" and s.messages == PARQUET_ROWS[0]["conversations"]


def test_max_rows_counts_across_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [_conv(i) for i in range(3)])
    b = write_jsonl(tmp_path / "b.jsonl", [_conv(i) for i in range(3, 6)])
    raws = list(iter_raw_rows(InputConfig(paths=[str(a), str(b)], max_rows=4)))
    assert [(r.file, r.line, r.index) for r in raws] == [(str(a), 1, 0), (str(a), 2, 1), (str(a), 3, 2), (str(b), 1, 3)]


def test_parquet_mixed_layouts_with_null_columns(tmp_path):
    path = _parquet_rows(tmp_path / "mixed.parquet", [{"turns": ["a prompt"], "text": None},
                                                      {"turns": None, "text": "a plain text row"}])
    parsed = [parse_row(r) for r in iter_raw_rows(InputConfig(paths=[str(path)]))]
    assert all(isinstance(p, Sample) for p in parsed), parsed


# ------------------------------------------------------------------ malformed rows through build_cache
def _no_model(monkeypatch):
    def refuse(cfg):
        raise AssertionError("the target model must not be loaded")
    monkeypatch.setattr(build_mod.TargetModel, "from_config", staticmethod(refuse))


def test_build_refuses_too_many_malformed_rows_before_loading_model(tiny_target, tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl"
    line_of = _write_lines(path, JSONL_LINES)
    pq_path = _parquet_rows(tmp_path / "rows.parquet", PARQUET_ROWS)
    expected = _expected_bad(path, JSONL_LINES, line_of) | {(str(pq_path), 2, "unknown role")}
    _no_model(monkeypatch)
    out = tmp_path / "cache"
    with pytest.raises(MalformedInputError) as e:
        build_cache(data_config(tiny_target, [path, pq_path], out, input={"max_malformed_fraction": 0.1}))
    msg = str(e.value)
    for f, line, _ in expected:
        assert f"{f}:{line}:" in msg
    assert f"{len(expected)} of {len(JSONL_LINES) + len(PARQUET_ROWS)} input rows are malformed" in msg
    rows = [json.loads(x) for x in (out / "malformed.jsonl").read_text().splitlines()]
    assert {(r["file"], r["line"]) for r in rows} == {(f, ln) for f, ln, _ in expected}
    assert not (out / "manifest.json").exists()


def test_build_with_permissive_fraction_records_malformed_rows(tiny_target, tmp_path):
    path = tmp_path / "rows.jsonl"
    line_of = _write_lines(path, JSONL_LINES)
    pq_path = _parquet_rows(tmp_path / "rows.parquet", PARQUET_ROWS)
    expected = _expected_bad(path, JSONL_LINES, line_of) | {(str(pq_path), 2, "unknown role")}
    out = tmp_path / "cache"
    manifest = build_cache(data_config(tiny_target, [path, pq_path], out, input={"max_malformed_fraction": 1.0}))
    counts = manifest["counts"]
    assert counts["rows"] == len(JSONL_LINES) + len(PARQUET_ROWS)
    assert counts["malformed"] == len(expected)
    assert {(r["file"], r["line"]) for r in manifest["malformed_rows"]} == {(f, ln) for f, ln, _ in expected}
    # Good rows: row0, row1, the text row, the ShareGPT row, 3 Parquet rows; the prompt-only row is dropped.
    ids = {s["sample_id"] for s in TargetCacheDataset(out, shuffle=False, prefetch=0)}
    assert {"row0", "row1", "row100", "row101", "row102"} <= ids and len(ids) == 7
    assert counts["samples"] == 7 and counts["dropped_short"] == 1
    assert counts["rows"] == counts["samples"] + counts["dropped_short"] + counts["malformed"]
    assert (out / "malformed.jsonl").exists()


# ------------------------------------------------------------------ loss masks
SYSTEM, U1, A1, U2, A2 = ("You are terse.", "What is two plus two?", "Four, of course.", "And three times three?",
                          "def nine():\n    return 9")
CONVERSATION = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": U1},
                {"role": "assistant", "content": A1}, {"role": "user", "content": U2},
                {"role": "assistant", "content": A2}]

GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Marks the last message: rendering a prefix changes how an earlier turn looks.
REWRITING_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if loop.last %}{{ '[latest] ' }}{% endif %}{{ message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture()
def tok():
    return AutoTokenizer.from_pretrained(TOY_DIR)


def _runs(ids: torch.Tensor, mask: torch.Tensor, tok, value: int = 1) -> list[str]:
    """Decoded text of each maximal run of tokens with mask == value."""
    out, cur = [], []
    for i, m in zip(ids.tolist(), mask.tolist()):
        if m == value:
            cur.append(i)
        elif cur:
            out.append(tok.decode(cur, skip_special_tokens=False))
            cur = []
    if cur:
        out.append(tok.decode(cur, skip_special_tokens=False))
    return out


def _chat(messages, sid="c"):
    return Sample(sid, 0, "f:1", messages=messages)


def _check_assistant_mask(tok, r):
    full = tok.decode(r.input_ids.tolist(), skip_special_tokens=False)
    assert full == tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert r.loss_mask.dtype == torch.uint8 and r.input_ids.dtype == torch.long
    assert _runs(r.input_ids, r.loss_mask, tok) == [A1 + "<|im_end|>", A2 + "<|im_end|>"]
    unmasked = "".join(_runs(r.input_ids, r.loss_mask, tok, value=0))
    for text in (SYSTEM, U1, U2, "<|im_start|>system", "<|im_start|>user", "<|im_start|>assistant"):
        assert text in unmasked


def test_loss_mask_chatml_prefix_rendering(tok):
    assert "{% generation %}" not in tok.chat_template
    _check_assistant_mask(tok, render_sample(tok, _chat(CONVERSATION), max_length=1000))


def test_loss_mask_generation_markers(tok):
    tok.chat_template = GENERATION_TEMPLATE
    r = render_sample(tok, _chat(CONVERSATION), max_length=1000)
    _check_assistant_mask(tok, r)


def test_template_rewriting_earlier_turns_raises(tok):
    tok.chat_template = REWRITING_TEMPLATE
    with pytest.raises(ChatTemplateError):
        render_sample(tok, _chat(CONVERSATION), max_length=1000)


def test_truncation_to_max_length(tok):
    full = render_sample(tok, _chat(CONVERSATION), max_length=1000)
    assert len(full.input_ids) > 30
    for n in (5, 30, len(full.input_ids) - 1):
        r = render_sample(tok, _chat(CONVERSATION), max_length=n)
        assert len(r.input_ids) == len(r.loss_mask) == n
        assert torch.equal(r.input_ids, full.input_ids[:n]) and torch.equal(r.loss_mask, full.loss_mask[:n])
    assert render_sample(tok, _chat(CONVERSATION), max_length=5).loss_tokens == 0


def test_plain_text_row_all_ones(tok):
    text = "Plain text rows supervise every token, including the first."
    r = render_sample(tok, Sample("t", 0, "f:1", text=text), max_length=1000)
    assert len(r.input_ids) > 5 and r.loss_tokens == len(r.input_ids)
    assert r.input_ids.tolist() == tok(text)["input_ids"]
    assert tok.decode(r.input_ids.tolist(), skip_special_tokens=True) == text
    assert len(render_sample(tok, Sample("t", 0, "f:1", text=text), max_length=4).input_ids) == 4


def test_prompt_only_rows_have_no_loss_tokens(tok):
    s = parse_row(next(iter_raw_rows_from([{"turns": ["first question", "second question"]}])))
    assert s.needs_answers
    r = render_sample(tok, s, max_length=1000)
    assert len(r.input_ids) > 0 and r.loss_tokens == 0


def iter_raw_rows_from(rows):
    from deepspec.data.sources import RawRow
    for i, row in enumerate(rows):
        yield RawRow(i, "mem.jsonl", i + 1, json.dumps(row))


def test_build_drops_prompt_only_rows_as_short(tiny_target, tmp_path):
    rows = [_conv(0), {"turns": ["q1"]}, _conv(1), {"turns": ["q2", "q3"]}, _conv(2), {"turns": ["q4"]}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "cache"
    manifest = build_cache(data_config(tiny_target, [path], out))
    assert manifest["counts"]["dropped_short"] == 3
    assert manifest["counts"]["samples"] == 3 and manifest["counts"]["malformed"] == 0
    ids = sorted(s["sample_id"] for s in TargetCacheDataset(out, shuffle=False, prefetch=0))
    assert ids == ["row0", "row1", "row2"]


def test_datasets_source_streams_a_local_folder(tmp_path):
    """input.dataset: a `datasets` name or path, streamed (here a local folder of JSONL files)."""
    from deepspec.config.data import InputConfig
    from deepspec.data.sources import Sample, iter_raw_rows, parse_row

    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [{"conversations": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(5)]
    (folder / "part.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    parsed = [parse_row(r) for r in iter_raw_rows(InputConfig(dataset=str(folder), max_rows=4))]
    assert [p.messages[1]["content"] for p in parsed if isinstance(p, Sample)] == ["a0", "a1", "a2", "a3"]
    assert parsed[0].source.endswith("[train]:1")
