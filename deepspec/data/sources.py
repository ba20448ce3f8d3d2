"""Input rows: JSONL / Parquet files or a ``datasets`` source, parsed into Samples.

Three row layouts are accepted:

* conversation rows  ``{"conversations": [{"role": "user", "content": "..."}, ...]}``
  (``messages`` as the key, and ShareGPT ``{"from": "human", "value": ...}`` turns, too);
* prompt rows        ``{"turns": ["first user turn", "second user turn", ...]}`` (the eval layout);
* plain text rows    ``{"text": "..."}`` (every token is supervised).

A row that fits none of them is a ``MalformedRow`` naming its file, line and reason; it is never
silently skipped. Rows are numbered globally (``index``) in the order the inputs are given; the
cache's shard k always holds rows [k*n, (k+1)*n), which is what makes builds resumable and
independent of the number of ranks.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pyarrow.parquet as pq

from deepspec.config.data import InputConfig

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "model": "assistant", "system": "system", "bot": "assistant"}


@dataclass
class Sample:
    """One parsed row. ``messages`` for chat rows, ``text`` for plain text rows."""

    sample_id: str
    index: int
    source: str  # "file:line"
    messages: Optional[list[dict]] = None
    text: Optional[str] = None

    @property
    def needs_answers(self) -> bool:
        """A prompt-only conversation (no assistant turn yet)."""
        return self.messages is not None and not any(m["role"] == "assistant" for m in self.messages)


@dataclass
class MalformedRow:
    index: int
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class RawRow:
    """A row before parsing: a JSONL line (str, or NotUtf8 when its bytes are not text) or a Parquet/datasets record (dict)."""

    index: int
    file: str
    line: int  # 1-based line (JSONL) or row number within the file (Parquet/datasets)
    payload: Any = field(repr=False)


def iter_raw_rows(cfg: InputConfig) -> Iterator[RawRow]:
    """Stream every input row in order, unparsed. Memory stays bounded by one row (one row group)."""
    index = 0
    for path in cfg.paths:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"input.paths: {path} does not exist")
        if p.suffix == ".parquet":
            rows = _parquet_rows(p)
        else:
            rows = _jsonl_rows(p)
        for line, payload in rows:
            if cfg.max_rows is not None and index >= cfg.max_rows:
                return
            yield RawRow(index, str(p), line, payload)
            index += 1
    if cfg.dataset:
        import datasets  # imported lazily: slow to import, and only this branch needs it

        ds = datasets.load_dataset(cfg.dataset, split=cfg.split, streaming=True)
        for line, payload in enumerate(ds, start=1):
            if cfg.max_rows is not None and index >= cfg.max_rows:
                return
            yield RawRow(index, f"{cfg.dataset}[{cfg.split}]", line, payload)
            index += 1


@dataclass(frozen=True)
class NotUtf8:
    """The payload of a JSONL line whose bytes are not UTF-8: a malformed row (never text with U+FFFD in it)."""

    offset: int  # of the first bad byte in the line

    def reason(self) -> str:
        return f"not valid UTF-8 (byte {self.offset} of the line)"


def _jsonl_rows(p: Path) -> Iterator[tuple[int, str | NotUtf8]]:
    """Lines split at b"\\n" only (a "\\r", U+2028 or U+2029 inside a row does not end it), each decoded strictly."""
    with open(p, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a BOM before the first row is no data
            except UnicodeDecodeError as e:
                yield line_no, NotUtf8(e.start)
                continue
            if line.strip():
                yield line_no, line


def _parquet_rows(p: Path) -> Iterator[tuple[int, dict]]:
    row = 0
    for batch in pq.ParquetFile(p).iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            row += 1
            yield row, rec


def parse_row(raw: RawRow) -> Sample | MalformedRow:
    """Parse and validate one row; never raises on bad data."""
    def bad(reason: str) -> MalformedRow:
        return MalformedRow(raw.index, raw.file, raw.line, reason)

    obj = raw.payload
    if isinstance(obj, NotUtf8):
        return bad(obj.reason())
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except json.JSONDecodeError as e:
            return bad(f"invalid JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict):
        return bad(f"expected a JSON object, got {type(obj).__name__}")
    source = f"{raw.file}:{raw.line}"
    messages: list[dict] | None = None
    # Layouts are chosen by non-null values: a Parquet file mixing layouts has null columns.
    conv = obj.get("conversations") if obj.get("conversations") is not None else obj.get("messages")
    if conv is not None:
        if not isinstance(conv, list) or not conv:
            return bad("'conversations' must be a non-empty list")
        messages = []
        for i, turn in enumerate(conv):
            if not isinstance(turn, dict):
                return bad(f"turn {i} is not an object")
            role = turn.get("role", turn.get("from"))
            content = turn.get("content", turn.get("value"))
            if not isinstance(role, str) or role not in ROLE_ALIASES:  # a list/dict role is unhashable
                return bad(f"turn {i} has unknown role {role!r}")
            if not isinstance(content, str):
                return bad(f"turn {i} has no string 'content'")
            messages.append({"role": ROLE_ALIASES[role], "content": content})
        if not any(m["role"] == "user" for m in messages):
            return bad("conversation has no user turn")
        if messages[0]["role"] == "assistant":  # it answers nothing, and chat templates cannot render what precedes it
            return bad("turn 0 is an assistant turn: a conversation starts with a user or system turn")
    elif obj.get("turns") is not None:
        turns = obj["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
            return bad("'turns' must be a non-empty list of non-empty strings")
        messages = [{"role": "user", "content": t} for t in turns]
    elif obj.get("text") is not None:
        if not isinstance(obj["text"], str) or not obj["text"]:
            return bad("'text' must be a non-empty string")
        return Sample(_sample_id(obj, {"text": obj["text"]}), raw.index, source, text=obj["text"])
    else:
        return bad(f"no 'conversations', 'messages', 'turns' or 'text' key (keys: {sorted(obj)[:8]})")
    return Sample(_sample_id(obj, messages), raw.index, source, messages=messages)


def _sample_id(obj: dict, content: Any) -> str:
    """Stable id: the row's own ``id`` if it has one, else a hash of its content (not its line number)."""
    if isinstance(obj.get("id"), (str, int)) and str(obj["id"]):
        return str(obj["id"])
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
