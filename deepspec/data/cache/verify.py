"""``verify`` and ``stats`` of a finished cache.

verify: every shard listed in the manifest exists, has the listed size and sha256, and every
record in it decodes (shapes consistent, values finite) with the listed sample and token counts;
no shard file on disk is left unlisted. Each problem names its shard.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from deepspec.data.cache.manifest import load_manifest
from deepspec.data.cache.records import RecordCodec
from deepspec.data.cache.shards import read_shard
from deepspec.integrity import sha256_file

SHARD_RE = re.compile(r"^shard-\d{6}\.(parquet|tar)$")


def codec_for(manifest: dict) -> RecordCodec:
    return RecordCodec(manifest["storage_dtype"], manifest["num_layers"], manifest["hidden_size"], manifest["topk_logprobs"])


def shard_file_problems(path: Path, shard: dict) -> list[str]:
    """What is wrong with one shard file against its manifest entry (missing, size, sha256); [] if nothing.
    Shared by ``verify`` and the reader, which checks each shard before it first reads it."""
    if not path.exists():
        return ["listed in the manifest but missing"]
    out, size = [], path.stat().st_size
    if size != shard["bytes"]:
        out.append(f"{size} bytes on disk, manifest says {shard['bytes']}")
    digest = sha256_file(path)
    if digest != shard["sha256"]:
        out.append(f"sha256 mismatch (manifest {shard['sha256'][:16]}..., file {digest[:16]}...)")
    return out


def verify_cache(cache_dir: str | Path, decode: bool = True) -> dict:
    """Check a cache; returns {"ok", "problems", "shards", "samples", "tokens"} (never raises on bad shards)."""
    cache_dir = Path(cache_dir)
    manifest = load_manifest(cache_dir)
    codec, problems = codec_for(manifest), []
    samples = tokens = 0
    for shard in manifest["shards"]:
        path = cache_dir / shard["file"]
        problems += [f"{shard['file']}: {p}" for p in shard_file_problems(path, shard)]
        if not path.exists():
            continue
        if not decode:
            continue
        n = t = 0
        try:
            for rec in read_shard(path, manifest["format"]):
                codec.decode(rec, dense_final=False)
                n, t = n + 1, t + rec.num_tokens
        except Exception as e:  # any decoding failure is a finding about this shard, not a crash
            problems.append(f"{shard['file']}: record {n} does not decode: {type(e).__name__}: {str(e)[:200]}")
            continue
        if (n, t) != (shard["samples"], shard["tokens"]):
            problems.append(f"{shard['file']}: holds {n} samples / {t} tokens, manifest says {shard['samples']} / {shard['tokens']}")
        samples, tokens = samples + n, tokens + t
    listed = {s["file"] for s in manifest["shards"]}
    problems += [f"{p.name}: shard file on disk but not in the manifest" for p in sorted(cache_dir.iterdir())
                 if SHARD_RE.match(p.name) and p.name not in listed]
    if decode and not problems and (samples, tokens) != (manifest["counts"]["samples"], manifest["counts"]["tokens"]):
        problems.append(f"manifest counts {manifest['counts']['samples']} samples / {manifest['counts']['tokens']} tokens, "
                        f"shards hold {samples} / {tokens}")
    return {"ok": not problems, "problems": problems, "shards": len(manifest["shards"]), "samples": samples, "tokens": tokens}


def cache_stats(cache_dir: str | Path) -> dict:
    """Summary of a cache from its manifest and records: sizes, bytes/token, length histogram."""
    cache_dir = Path(cache_dir)
    m = load_manifest(cache_dir)
    lengths: Counter = Counter()
    for shard in m["shards"]:
        for rec in read_shard(cache_dir / shard["file"], m["format"]):
            lengths[min(rec.num_tokens // 128, 32) * 128] += 1
    c = m["counts"]
    sup = c["supervised_positions"] / max(c["tokens"], 1)
    return {
        "cache_dir": str(cache_dir), "format": m["format"], "storage_dtype": m["storage_dtype"],
        "target": m["target"]["name_or_path"], "layer_ids": m["layer_ids"], "hidden_size": m["hidden_size"],
        "counts": c, "shards": len(m["shards"]), "bytes": m["bytes"],
        "bytes_per_token_measured": m["bytes_per_token"],
        "bytes_per_token_formula": codec_for(m).bytes_per_token(sup),
        "supervised_fraction": sup, "loss_token_fraction": c["loss_tokens"] / max(c["tokens"], 1),
        "length_histogram_128": dict(sorted(lengths.items())),
    }
