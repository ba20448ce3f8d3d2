"""verify/stats of a finished cache, the reader's sharding and shuffling, target checks, and the size estimate."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import data_config
from torch.utils.data import DataLoader

from deepspec.config.data import TargetConfig
from deepspec.data.build import build_cache
from deepspec.data.cache.manifest import CacheMismatchError
from deepspec.data.cache.reader import TargetCacheDataset
from deepspec.data.cache.records import RecordCodec
from deepspec.data.cache.shards import read_shard
from deepspec.data.cache.verify import cache_stats, verify_cache
from deepspec.data.estimate import estimate_cache
from deepspec.target import target_identity

FORMATS = ("parquet", "webdataset")
ROWS = 20  # 3 shards of 8, 8 and 4 rows
LAYERS = [-1, 1, 3]


def _cfg(tiny_target, chat_jsonl, out, fmt):
    cache = {"format": fmt, "storage_dtype": "fp8" if fmt == "parquet" else "int8",
             "compression": "none" if fmt == "parquet" else "zstd", "topk_logprobs": 2 if fmt == "parquet" else 0}
    return data_config(tiny_target, [chat_jsonl], out, max_length=96, input={"max_rows": ROWS}, cache=cache)


@pytest.fixture(scope="module")
def caches(tiny_target, chat_jsonl, tmp_path_factory):
    out = {}
    for fmt in FORMATS:
        d = tmp_path_factory.mktemp(f"cache_{fmt}")
        cfg = _cfg(tiny_target, chat_jsonl, d, fmt)
        out[fmt] = (cfg, build_cache(cfg), d)
    return out


@pytest.fixture(params=FORMATS)
def cache(request, caches):
    return caches[request.param]


def _copy(cache_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(cache_dir, dst)
    return dst


def _records(cache_dir: Path, manifest: dict):
    for shard in manifest["shards"]:
        yield from read_shard(cache_dir / shard["file"], manifest["format"])


def _shard_files(cache_dir: Path, manifest: dict) -> list[str]:
    ext = ".parquet" if manifest["format"] == "parquet" else ".tar"
    return sorted(p.name for p in cache_dir.iterdir() if p.name.startswith("shard-") and p.name.endswith(ext))


# ------------------------------------------------------------------ verify
def test_fresh_cache_verifies(cache):
    cfg, manifest, d = cache
    assert manifest["num_shards"] == 3 and len(_shard_files(d, manifest)) == 3
    recs = list(_records(d, manifest))
    report = verify_cache(d)
    assert report["ok"] and report["problems"] == []
    assert report["shards"] == 3
    assert report["samples"] == len(recs) == manifest["counts"]["samples"] > 0
    assert report["tokens"] == sum(r.num_tokens for r in recs) == manifest["counts"]["tokens"]


@pytest.mark.parametrize("k", [0, 1, 2])
def test_flipped_byte_names_its_shard(cache, k, tmp_path):
    _, manifest, d = cache
    d = _copy(d, tmp_path)
    name = manifest["shards"][k]["file"]
    data = bytearray((d / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / name).write_bytes(bytes(data))
    for decode in (True, False):
        report = verify_cache(d, decode=decode)
        assert not report["ok"]
        assert report["problems"], report
        assert all(p.startswith(name + ":") for p in report["problems"]), report["problems"]
        assert any("sha256" in p for p in report["problems"])


def test_missing_and_truncated_shards_reported(cache, tmp_path):
    _, manifest, d = cache
    d = _copy(d, tmp_path)
    gone, cut = manifest["shards"][1]["file"], manifest["shards"][2]["file"]
    (d / gone).unlink()
    data = (d / cut).read_bytes()
    (d / cut).write_bytes(data[: len(data) - 100])
    report = verify_cache(d)
    assert not report["ok"]
    assert any(p.startswith(gone + ":") and "missing" in p for p in report["problems"]), report["problems"]
    assert any(p.startswith(cut + ":") and "bytes" in p for p in report["problems"]), report["problems"]
    first = manifest["shards"][0]["file"]
    assert not any(p.startswith(first) for p in report["problems"])


def test_unlisted_shard_reported(cache, tmp_path):
    _, manifest, d = cache
    d = _copy(d, tmp_path)
    first = manifest["shards"][0]["file"]
    extra = first.replace("000000", "000007")
    shutil.copy(d / first, d / extra)
    report = verify_cache(d)
    assert not report["ok"]
    assert [p for p in report["problems"] if p.startswith(extra + ":")] and "not in the manifest" in report["problems"][0]
    assert len(report["problems"]) == 1


def test_cache_stats_consistent_with_manifest_and_records(cache):
    _, manifest, d = cache
    st = cache_stats(d)
    recs = list(_records(d, manifest))
    tokens = sum(r.num_tokens for r in recs)
    sup = sum(int(r.loss_mask[1:].astype(bool).sum()) for r in recs)
    on_disk = sum((d / f).stat().st_size for f in _shard_files(d, manifest))
    assert st["counts"] == manifest["counts"]
    assert st["counts"]["samples"] == len(recs) and st["counts"]["tokens"] == tokens
    assert st["counts"]["loss_tokens"] == sum(int(r.loss_mask.sum()) for r in recs)
    assert st["counts"]["supervised_positions"] == sup
    assert st["counts"]["rows"] == ROWS
    assert st["shards"] == 3 and st["bytes"] == on_disk == manifest["bytes"]
    assert st["bytes_per_token_measured"] == pytest.approx(on_disk / tokens)
    assert st["supervised_fraction"] == pytest.approx(sup / tokens)
    assert st["format"] == manifest["format"] and st["storage_dtype"] == manifest["storage_dtype"]
    assert sum(st["length_histogram_128"].values()) == len(recs)
    assert st["length_histogram_128"] == {0: len(recs)}  # every sample is truncated to 96 < 128 tokens


# ------------------------------------------------------------------ reader
def _ids(it) -> list[str]:
    return [s["sample_id"] for s in it]


def _all_ids(d, manifest) -> list[str]:
    return [r.sample_id for r in _records(d, manifest)]


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_ranks_partition_the_cache(cache, shuffle):
    _, manifest, d = cache
    every = _all_ids(d, manifest)
    assert len(set(every)) == len(every)
    parts = [_ids(TargetCacheDataset(d, shuffle=shuffle, seed=1, rank=r, world_size=2, prefetch=2)) for r in (0, 1)]
    assert parts[0] and parts[1]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(every)


def test_unshuffled_order_is_file_order(cache):
    _, manifest, d = cache
    assert _ids(TargetCacheDataset(d, shuffle=False, prefetch=0, rank=0, world_size=1)) == _all_ids(d, manifest)
    assert _ids(TargetCacheDataset(d, shuffle=False, prefetch=4, rank=0, world_size=1)) == _all_ids(d, manifest)




@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_dataloader_workers_see_each_sample_once(caches, fmt):
    _, manifest, d = caches[fmt]
    every = sorted(_all_ids(d, manifest))
    ds = TargetCacheDataset(d, shuffle=True, seed=2, rank=0, world_size=1, prefetch=2)
    got = _ids(DataLoader(ds, batch_size=None, num_workers=2))
    assert sorted(got) == every


def test_dataloader_workers_times_ranks(caches):
    _, manifest, d = caches["parquet"]
    got = []
    for r in (0, 1):
        ds = TargetCacheDataset(d, shuffle=True, seed=4, rank=r, world_size=2, prefetch=2)
        got += _ids(DataLoader(ds, batch_size=None, num_workers=2))
    assert sorted(got) == sorted(_all_ids(d, manifest))


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_ranks_under_torchrun_environment(caches, fmt, monkeypatch):
    _, manifest, d = caches[fmt]
    got = []
    for r in (0, 1):  # what torchrun sets for each process
        monkeypatch.setenv("RANK", str(r))
        monkeypatch.setenv("WORLD_SIZE", "2")
        got += _ids(TargetCacheDataset(d, shuffle=False, prefetch=0))
    assert sorted(got) == sorted(_all_ids(d, manifest))


def test_shuffle_reproducible_per_epoch(cache):
    _, manifest, d = cache

    def order(epoch, seed=7):
        ds = TargetCacheDataset(d, shuffle=True, seed=seed, shuffle_buffer=4, rank=0, world_size=1, prefetch=2)
        ds.set_epoch(epoch)
        return _ids(ds)

    e1 = order(1)
    assert e1 == order(1)
    assert sorted(e1) == sorted(_all_ids(d, manifest))
    assert e1 != order(2)
    assert e1 != _all_ids(d, manifest)  # actually shuffled


def test_reader_len_and_tensors(cache):
    cfg, manifest, d = cache
    ds = TargetCacheDataset(d, shuffle=False, prefetch=0, out_dtype=torch.bfloat16, dense_final=False)
    assert len(ds) == manifest["counts"]["samples"]
    s = next(iter(ds))
    S, P = len(s["input_ids"]), int(s["loss_mask"][1:].sum())
    assert s["hidden"].dtype == torch.bfloat16 and s["hidden"].shape == (S, len(LAYERS) * manifest["hidden_size"])
    assert s["final_hidden"].shape == (P, manifest["hidden_size"])


def test_reader_checks_target(cache, tiny_target, other_tiny_target):
    _, manifest, d = cache
    own = target_identity(TargetConfig(name_or_path=str(tiny_target), layer_ids=LAYERS))
    TargetCacheDataset(d, target=own, layer_ids=LAYERS)  # the right target is accepted
    other = target_identity(TargetConfig(name_or_path=str(other_tiny_target), layer_ids=LAYERS))
    with pytest.raises(CacheMismatchError) as e:
        TargetCacheDataset(d, target=other, layer_ids=LAYERS)
    assert "weights_fingerprint" in str(e.value) and str(other_tiny_target) in str(e.value)
    with pytest.raises(CacheMismatchError) as e:
        TargetCacheDataset(d, target=own, layer_ids=[0, 1, 3])
    assert "layer_ids" in str(e.value) and "weights_fingerprint" not in str(e.value)


# ------------------------------------------------------------------ estimate
def test_estimate_equals_measured_record_bytes(cache):
    cfg, manifest, d = cache
    est = estimate_cache(cfg)
    recs = list(_records(d, manifest))
    tokens = sum(r.num_tokens for r in recs)
    sup = sum(int(r.loss_mask[1:].astype(bool).sum()) for r in recs)
    c = manifest["counts"]
    assert "regeneration_upper_bound_tokens" not in est
    assert (est["rows"], est["malformed"], est["samples"], est["dropped_short"], est["tokens"]) == \
        (c["rows"], c["malformed"], c["samples"], c["dropped_short"], c["tokens"])
    assert est["tokens"] == tokens
    assert est["supervised_fraction"] == pytest.approx(sup / tokens, rel=1e-12)
    L, dim, k = len(LAYERS), manifest["hidden_size"], cfg.cache.topk_logprobs
    assert (est["hidden_size"], est["layer_ids"]) == (dim, LAYERS)
    measured = sum(r.nbytes for r in recs)
    dt = cfg.cache.storage_dtype
    assert est["by_storage_dtype"][dt]["bytes_per_token"] == pytest.approx(measured / tokens, rel=1e-12)
    assert est["by_storage_dtype"][dt]["bytes"] == pytest.approx(measured, rel=1e-12)
    assert RecordCodec(dt, L, dim, k).bytes_per_token(sup / tokens) == pytest.approx(measured / tokens, rel=1e-12)
    # The other dtypes: re-encode the cached tensors in each and measure again.
    codec = RecordCodec(dt, L, dim, k)
    decoded = [codec.decode(r) for r in recs]
    for other in ("bf16", "fp16", "fp8", "int8"):
        c2 = RecordCodec(other, L, dim, k)
        total = sum(c2.encode(s["sample_id"], s["input_ids"], s["loss_mask"], s["hidden"], s["final_hidden"],
                              (s["topk_ids"], s["topk_logprobs"]) if k else None).nbytes for s in decoded)
        assert est["by_storage_dtype"][other]["bytes_per_token"] == pytest.approx(total / tokens, rel=1e-12), other


def test_abandoned_iterator_stops_prefetch_thread(caches):
    import threading
    import time

    _, manifest, d = caches["parquet"]
    before = set(threading.enumerate())
    it = iter(TargetCacheDataset(d, shuffle=False, prefetch=1, rank=0, world_size=1))
    next(it)
    time.sleep(0.5)  # let the producer fill the queue and block
    new = [t for t in threading.enumerate() if t not in before]
    assert new, "the reader should run a prefetch thread"
    it.close()  # what a consumer's `break` does to the generator
    for t in new:
        t.join(timeout=2)
    assert not any(t.is_alive() for t in new)


# ------------------------------------------------------------------ elastic resume
def _take(ds: TargetCacheDataset, workers: int, micro: int, batches: int | None) -> list[str]:
    """Sample ids of the first ``batches`` micro-batches (all if None) a DataLoader hands out, as in training."""
    import itertools

    loader = DataLoader(ds, batch_size=micro, num_workers=workers, collate_fn=lambda samples: [s["sample_id"] for s in samples])
    return [i for batch in itertools.islice(loader, batches) for i in batch]


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_epoch_resumed_on_other_rank_counts_sees_every_sample_once(caches, fmt):
    """2 ranks x 2 workers stop mid-epoch, 3 ranks x 1 worker go on and stop, 1 rank finishes the epoch: every sample of
    the epoch exactly once (shuffled units, a shuffle buffer and uneven stops per rank, as a preemption leaves them)."""
    from dataclasses import asdict

    from deepspec.training.data import DataPosition

    _, manifest, d = caches[fmt]
    every = _all_ids(d, manifest)

    def dataset(rank, world, position: DataPosition, micro):
        ds = TargetCacheDataset(d, shuffle=True, seed=3, shuffle_buffer=3, rank=rank, world_size=world, prefetch=0)
        ds.set_epoch(position.epoch, position.batches, micro, position.segments())
        return ds

    seen, position, saved = [], DataPosition(epoch=1), []
    for world, workers, micro, stops in [(2, 2, 2, [2, 1]), (3, 1, 1, [1, 2, 1])]:
        for rank, batches in enumerate(stops):
            seen += _take(dataset(rank, world, position, micro), workers, micro, batches)
        saved = [{"position": {**asdict(position), "batches": b}, "data_workers": workers, "micro_batch_size": micro}
                 for b in stops]
        position = DataPosition.after_resize(saved, world + 1)
    seen += _take(dataset(0, 1, position, 2), 0, 2, None)
    assert len(position.earlier) == 2
    assert sorted(seen) == sorted(every), "a sample was seen twice or skipped"
