"""Checksums of the files deepspec publishes (cache shards, manifest, checkpoints, exports), and their check
at read time. A flipped byte, a truncation or a deleted file is reported by file name; nothing is read
as if it were intact.

    sha256_file(path)                       hex digest, streamed
    file_checksums(folder, names)           {name: sha256} of files in a folder
    checksum_problems(folder, expected)     every file whose bytes differ from ``expected`` (or is missing)
    self_digest(obj) / check_self_digest    a JSON document that carries the digest of its own content
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

SELF_DIGEST_KEY = "content_sha256"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_checksums(folder: Path, names) -> dict[str, str]:
    return {name: sha256_file(folder / name) for name in sorted(names)}


def checksum_problems(folder: Path, expected: dict[str, str]) -> list[str]:
    """Files of ``folder`` whose sha256 is not the recorded one, each named with what is wrong."""
    out = []
    for name, digest in sorted(expected.items()):
        path = folder / name
        if Path(name).name != name:
            out.append(f"{folder}: checksum entry {name!r} is not a plain file name (refused)")
        elif not path.is_file():
            out.append(f"{path}: missing")
        elif sha256_file(path) != digest:
            out.append(f"{path}: sha256 differs from the recorded {digest[:12]}... (corrupt or replaced)")
    return out


def self_digest(obj: dict) -> str:
    """sha256 of a JSON document's canonical form, without its own digest key."""
    body = {k: v for k, v in obj.items() if k != SELF_DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def with_self_digest(obj: dict) -> dict:
    return {**obj, SELF_DIGEST_KEY: self_digest(obj)}


def read_json_checked(path: Path, what: str, error: type[Exception] = ValueError) -> dict:
    """Load a JSON document written ``with_self_digest``: a parse error or a digest mismatch raises ``error``
    naming the file. Documents without a digest (written by older versions) are read as they are."""
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: {what} is not valid JSON ({e}); it is corrupt") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: {what} is not a JSON object; it is corrupt")
    if SELF_DIGEST_KEY in obj and obj[SELF_DIGEST_KEY] != self_digest(obj):
        raise error(f"{path}: {what} does not match its own {SELF_DIGEST_KEY} (edited or corrupt)")
    return obj
