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


# ---------------------------------------------------------------- manifest, checkpoints, exports
KINDS = ["flip", "truncate", "delete"]


@pytest.mark.parametrize("seed", range(20))
def test_a_damaged_manifest_is_refused_by_name_and_a_rerun_rewrites_it(pristine, tmp_path, seed):
    cfg, source = pristine
    rng = random.Random(seed)
    cache = tmp_path / "cache"
    shutil.copytree(source, cache)
    kind = KINDS[seed % 3]
    damage(cache / "manifest.json", kind, rng)
    with pytest.raises((CacheCorruptError, FileNotFoundError), match="manifest.json"):
        load_manifest(cache)
    if kind == "delete":  # the build resumes: every shard is there, so only the manifest is written again
        build_cache(data_config(cfg.target.name_or_path, list(cfg.input.paths), cache, input={"max_rows": 16}, max_length=96,
                                cache={"samples_per_shard": 4}))
        assert load_manifest(cache) == load_manifest(source)


def _fake_checkpoint(root, step: int, rng: random.Random):
    from deepspec.training.checkpoint import write_marker

    path = root / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "trainer_state_rank0.json",
                 "trainer_state_rank0.safetensors"):
        (path / name).write_bytes(rng.randbytes(rng.randint(50, 400)))
    write_marker(path, step)
    return path


@pytest.mark.parametrize("seed", range(30))
def test_a_damaged_checkpoint_is_named_and_auto_resume_falls_back_to_the_intact_one(tmp_path, seed):
    from deepspec.training.checkpoint import CheckpointCorruptError, CheckpointManager, verify_checkpoint

    rng = random.Random(seed)
    older, newer = _fake_checkpoint(tmp_path, 100, rng), _fake_checkpoint(tmp_path, 200, rng)
    assert verify_checkpoint(older) == verify_checkpoint(newer) == []
    victim = rng.choice(sorted(newer.iterdir()))
    kind = KINDS[seed % 3] if victim.name != "complete" else rng.choice(["flip", "truncate"])  # no marker = not complete
    damage(victim, kind, rng)
    problems = verify_checkpoint(newer)
    assert problems and all(str(newer) in p for p in problems) and any(victim.name in p for p in problems), problems
    mgr = CheckpointManager(tmp_path, keep_last=3, rank=0)
    assert mgr.resolve("auto") == older
    with pytest.raises(CheckpointCorruptError, match=victim.name):
        mgr.resolve(str(newer))


@pytest.fixture(scope="module")
def pristine_export(tiny_target, tmp_path_factory):
    import torch

    from deepspec.export import export_drafter
    from deepspec.training.trainer import build_drafter
    from test_online_and_export import DRAFTER, train_cfg

    cfg = train_cfg(tiny_target, [], DRAFTER["dspark"], cache_dir="unused")
    drafter, _ = build_drafter(cfg, torch.device("cpu"))
    return export_drafter(drafter, tmp_path_factory.mktemp("export") / "export", target=cfg.target), cfg.target


@pytest.mark.parametrize("seed", range(24))
def test_a_damaged_export_is_refused_by_name(pristine_export, tmp_path, seed):
    from deepspec.export import load_drafter

    source, target = pristine_export
    rng = random.Random(seed)
    export = tmp_path / "export"
    shutil.copytree(source, export)
    victim = export / ["config.json", "model.safetensors", "checksums.json"][seed % 3]
    damage(victim, KINDS[(seed // 3) % 3], rng)
    with pytest.raises((ValueError, FileNotFoundError), match=victim.name):
        load_drafter(export, target=target)
