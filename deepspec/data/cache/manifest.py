"""manifest.json: what a cache holds, for whom, and the checksum of every shard.

A build first writes ``plan.json`` (the settings that fix the cache's bytes: target identity,
layers, dtype, format, sources, ...). Each finished shard has a sidecar ``shard-K.stats.json``
with its counts and sha256. Once every shard exists, ``finalize`` folds plan and sidecars into
``manifest.json``, which carries the sha256 of its own content (``content_sha256``), checked with
the shards' at read time. A cache is complete exactly when manifest.json exists.
"""
from __future__ import annotations

import json
from pathlib import Path

from deepspec.data.cache.shards import shard_name, write_json_atomic
from deepspec.integrity import SELF_DIGEST_KEY, read_json_checked, with_self_digest
from deepspec.target import TargetIdentity

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
COUNT_KEYS = ("rows", "samples", "tokens", "loss_tokens", "supervised_positions", "dropped_short",
              "regenerate_failed", "malformed")


class CacheMismatchError(ValueError):
    """A cache that does not belong to the configured target (or to the settings of a resumed build)."""


class CacheCorruptError(ValueError):
    """A shard's bytes are not what the manifest recorded (flipped, truncated, replaced or missing)."""


def stats_name(index: int) -> str:
    return f"shard-{index:06d}.stats.json"


def check_or_write_plan(out_dir: Path, plan: dict, write: bool) -> None:
    """Refuse to resume into ``out_dir`` if it was started with other settings; else record the plan."""
    path = out_dir / PLAN
    if path.exists():
        old = json.loads(path.read_text())
        diff = [f"{k}: on disk {old.get(k)!r} vs now {plan.get(k)!r}" for k in sorted(set(old) | set(plan))
                if old.get(k) != plan.get(k)]
        if diff:
            raise CacheMismatchError(
                f"{out_dir} holds a cache started with other settings, so it cannot be resumed:\n  "
                + "\n  ".join(d[:300] for d in diff) + "\nuse another out_dir, or delete this one to start over")
    elif write:
        write_json_atomic(path, plan)


def finalize(out_dir: Path) -> dict:
    """Fold plan.json and every shard's stats into manifest.json; raises if a shard is missing."""
    plan = json.loads((out_dir / PLAN).read_text())
    shards, counts, malformed = [], dict.fromkeys(COUNT_KEYS, 0), []
    missing = [k for k in range(plan["num_shards"]) if not (out_dir / shard_name(k, plan["format"])).exists()]
    if missing:
        raise FileNotFoundError(f"{out_dir}: cannot finalize, shards {missing[:10]} (of {len(missing)} missing) are not built yet")
    for k in range(plan["num_shards"]):
        st = json.loads((out_dir / stats_name(k)).read_text())
        shards.append({key: st[key] for key in ("index", "file", "samples", "tokens", "bytes", "sha256")})
        for key in COUNT_KEYS:
            counts[key] += st["malformed"].__len__() if key == "malformed" else st[key]
        malformed += st["malformed"]
    total_bytes = sum(s["bytes"] for s in shards)
    manifest = {
        **plan,
        "counts": counts,
        "malformed_rows": malformed[:1000],
        "bytes": total_bytes,
        "bytes_per_token": total_bytes / max(counts["tokens"], 1),
        "shards": shards,
    }
    manifest = with_self_digest(manifest)  # a flipped byte in the manifest itself is caught at read time
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


# What finalize adds to the plan (with the manifest's own digest): the rest of a manifest is its plan.
BUILT_KEYS = ("counts", "malformed_rows", "bytes", "bytes_per_token", "shards")


def build_plan(manifest: dict) -> dict:
    """The settings a finished cache was built with: its manifest less what the build produced."""
    return {k: v for k, v in manifest.items() if k not in BUILT_KEYS and k != SELF_DIGEST_KEY}


def load_manifest(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        hint = " (a build is in progress or was interrupted: rerun it to resume)" if (Path(cache_dir) / PLAN).exists() else ""
        raise FileNotFoundError(f"{path} not found: {cache_dir} is not a finished deepspec cache{hint}")
    manifest = read_json_checked(path, "the cache manifest", CacheCorruptError)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheMismatchError(f"{path}: format_version {manifest.get('format_version')} is not {FORMAT_VERSION}")
    for shard in manifest.get("shards", []):
        check_inside(Path(cache_dir), shard.get("file"), f"{path}: shard {shard.get('index')}")
    return manifest


def check_inside(cache_dir: Path, file, where: str) -> Path:
    """A manifest's shard entry must name a file directly in the cache folder: not absolute, no
    directories or '..', and not a symlink that leads out of it (a manifest may come from elsewhere,
    and readers open what it lists). -> the path; ValueError naming the entry otherwise."""
    if not isinstance(file, str) or not file or Path(file).name != file or file in (".", ".."):
        raise ValueError(f"{where}: file {file!r} is not a plain file name inside the cache (refused)")
    path = cache_dir / file
    root = cache_dir.resolve()
    if path.is_symlink() and root not in path.resolve().parents:
        raise ValueError(f"{where}: {file} is a symlink to {path.resolve()}, outside the cache {root} (refused)")
    return path


def check_target(manifest: dict, identity: TargetIdentity, layer_ids: list[int] | None, cache_dir) -> None:
    """Raise CacheMismatchError naming every difference between the cache and the configured target."""
    cached = TargetIdentity(**manifest["target"])
    problems = identity.mismatches(cached)
    if layer_ids is not None and list(layer_ids) != manifest["layer_ids"]:
        problems.append(f"layer_ids: cache has {manifest['layer_ids']}, config has {list(layer_ids)}")
    if problems:
        raise CacheMismatchError(
            f"cache {cache_dir} was built for target {cached.name_or_path!r}, which does not match the configured "
            f"target {identity.name_or_path!r}:\n  " + "\n  ".join(problems))
