"""Corruption campaign: random byte flips, truncations and deletions of cache shards are detected
before a byte of them is trained on (reader) and by `verify`, each naming the file; deleting the bad
shards and rerunning the build rebuilds only those, byte-identical to the original."""
from __future__ import annotations

import json
import random
import shutil

import pytest

from conftest import data_config
from deepspec.data.build import build_cache
from deepspec.data.cache.manifest import CacheCorruptError, load_manifest
from deepspec.data.cache.reader import TargetCacheDataset
from deepspec.data.cache.verify import verify_cache


@pytest.fixture(scope="module")
def pristine(tiny_target, chat_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("pristine_cache")
    cfg = data_config(tiny_target, [chat_jsonl], out, input={"max_rows": 16}, max_length=96, cache={"samples_per_shard": 4})
    build_cache(cfg)
    return cfg, out


def damage(path, kind: str, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    if kind == "flip":
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
    elif kind == "truncate":
        path.write_bytes(bytes(data[: rng.randrange(len(data))]))
    else:
        path.unlink()


@pytest.mark.parametrize("seed", range(12))
def test_every_damaged_shard_is_detected_and_rebuilt_alone(pristine, tmp_path, seed):
    cfg, source = pristine
    rng = random.Random(seed)
    cache = tmp_path / "cache"
    shutil.copytree(source, cache)
    shards = load_manifest(cache)["shards"]
    bad = rng.sample(shards, rng.randint(1, 2))
    for shard in bad:
        damage(cache / shard["file"], rng.choice(["flip", "truncate", "delete"]), rng)
    report = verify_cache(cache)
    assert not report["ok"] and {p.split(":")[0] for p in report["problems"]} >= {s["file"] for s in bad}
    with pytest.raises(CacheCorruptError, match="|".join(s["file"] for s in bad)):
        for _ in TargetCacheDataset(cache, shuffle=False, prefetch=0, rank=0, world_size=1):
            pass
    for shard in bad:  # what the error says to do: delete the bad shards, rerun the build
        (cache / shard["file"]).unlink(missing_ok=True)
    bad_stems = {s["file"].split(".")[0] for s in bad}  # a shard and its stats file
    before = {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*") if p.name.split(".")[0] not in bad_stems}
    build_cache(data_config(cfg.target.name_or_path, list(cfg.input.paths), cache, input={"max_rows": 16}, max_length=96,
                            cache={"samples_per_shard": 4}))
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*") if p.name in before} == before  # untouched
    assert json.loads((cache / "manifest.json").read_text())["shards"] == json.loads((source / "manifest.json").read_text())["shards"]
    assert verify_cache(cache)["ok"]
