"""Files others read, pinned to what was trained and what was written.

1. Exports: every config key a serving engine's loader reads (``serving_loaders.REQUIREMENTS``) holds the value of
   the trained drafter, written out here ([-1, 1, 3] are the tiny drafters' target layers, vLLM's Eagle3 ids are
   those + 1 = [0, 2, 4], ...), not compared with another output of the exporter. Our own loader reads the
   ``deepspec`` block, so a top-level key written wrong would load fine here and shift the layers in an engine.
   A folder in the reference layout (no ``deepspec`` block) loads back with the same fields.
2. The cache reader checksums every shard on every path that reads one (plain, prefetched, DataLoader workers,
   a resumed epoch that passes the bad shard's records over undecoded, an elastic replay that reads only ids):
   a byte flipped where the tar reader never looks (the end-of-archive padding) is caught by sha256 alone.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import data_config
from torch.utils.data import DataLoader

from deepspec.data.build import build_cache
from deepspec.data.cache.manifest import CacheCorruptError, load_manifest
from deepspec.data.cache.reader import StreamSegment, TargetCacheDataset
from deepspec.data.cache.shards import read_webdataset_shard
from deepspec.data.cache.verify import verify_cache
from deepspec.export import export_drafter, load_drafter
from deepspec.serving_loaders import REQUIREMENTS, _get
from test_drafters import make, parts  # noqa: F401 (fixture; drafters with target layers [-1, 1, 3], mask 3, block 4)


def expected_keys(kind: str, target: dict, drafter) -> dict:
    """The values a loader must read, from the tiny drafters' construction (test_drafters.make) and the target's
    own config.json."""
    shape = {k: target[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                                    "rms_norm_eps", "vocab_size")}
    if kind == "eagle3":
        inter = drafter.cfg.intermediate_size or target["intermediate_size"]
        return {**shape, "intermediate_size": inter, "num_hidden_layers": 1, "draft_vocab_size": target["vocab_size"],
                "eagle_config.eagle_aux_hidden_state_layer_ids": [-1, 1, 3], "eagle_aux_hidden_state_layer_ids": [0, 2, 4]}
    out = {**shape, "num_hidden_layers": 2, "num_target_layers": target["num_hidden_layers"], "target_layer_ids": [-1, 1, 3],
           "mask_token_id": 3, "block_size": 4}
    if kind == "dflash":
        return {**out, "dflash_config.target_layer_ids": [-1, 1, 3], "dflash_config.mask_token_id": 3, "dflash_config.block_size": 4}
    return {**out, "markov_rank": 8, "markov_head_type": kind, "confidence_head_with_markov": True, "enable_confidence_head": True,
            "num_anchors": 6}


@pytest.mark.parametrize("kind", ["vanilla", "gated", "dflash", "eagle3"])
def test_every_key_a_loader_reads_holds_the_trained_value(parts, tiny_target, tmp_path, kind):  # noqa: F811
    drafter = make(kind, parts)
    out = export_drafter(drafter, tmp_path / kind)
    config = json.loads((out / "config.json").read_text())
    target = json.loads((tiny_target / "config.json").read_text())
    expected = expected_keys(kind, target, drafter)
    name = "dspark" if kind in ("vanilla", "gated") else kind
    read = {k for req in REQUIREMENTS if req.drafter == name and req.family == "qwen3" for k in req.config_keys}
    assert read, name
    for key in sorted(read | set(expected)):
        assert key in expected, f"a loader reads {key!r}: add its trained value to expected_keys"
        assert _get(config, key) == expected[key], (key, _get(config, key), expected[key])


@pytest.mark.parametrize("kind", ["vanilla", "dflash"])
def test_a_reference_layout_folder_loads_back_the_trained_fields(parts, tiny_target, tmp_path, kind):  # noqa: F811
    """Without the ``deepspec`` block the loader reads the top-level keys, as another tool's folder is read."""
    out = export_drafter(make(kind, parts), tmp_path / kind)
    config = json.loads((out / "config.json").read_text())
    del config["deepspec"]
    (out / "config.json").write_text(json.dumps(config))
    (out / "checksums.json").unlink()  # the folder of another tool carries none
    c = load_drafter(out).cfg
    assert (c.target_layer_ids, c.mask_token_id, c.block_size, c.num_hidden_layers) == ([-1, 1, 3], 3, 4, 2)
    if kind == "vanilla":
        assert (c.markov_rank, c.markov_head_type, c.confidence_head_with_markov) == (8, "vanilla", True)


@pytest.fixture(scope="module")
def tar_cache(tiny_target, chat_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("tar_cache")
    cache = {"format": "webdataset", "storage_dtype": "int8", "compression": "none", "topk_logprobs": 0, "samples_per_shard": 4}
    build_cache(data_config(tiny_target, [chat_jsonl], out, max_length=96, input={"max_rows": 12}, cache=cache))
    return out


def test_every_reader_path_checks_the_shard_checksum(tar_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tar_cache, cache)
    shards = load_manifest(cache)["shards"]
    assert len(shards) >= 2
    bad = cache / shards[0]["file"]
    ids_before = [r.sample_id for r in read_webdataset_shard(bad)]
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF  # the tar's end-of-archive padding: no tar reader looks at it
    bad.write_bytes(bytes(data))
    assert [r.sample_id for r in read_webdataset_shard(bad)] == ids_before  # still reads: only the sha256 can tell

    def dataset(**kw):
        return TargetCacheDataset(cache, **{"shuffle": False, "prefetch": 0, "rank": 0, "world_size": 1, **kw})

    assert any(shards[0]["file"] in p and "sha256" in p for p in verify_cache(cache)["problems"])
    assert any(shards[0]["file"] in p and "sha256" in p for p in verify_cache(cache, decode=False)["problems"])
    paths = {"plain": lambda: list(dataset()), "prefetched": lambda: list(dataset(prefetch=4)),
             "shuffled": lambda: list(dataset(shuffle=True, seed=3)),
             "workers": lambda: list(DataLoader(dataset(), batch_size=None, num_workers=2))}

    def resumed():  # the bad shard's records are all passed over undecoded
        ds = dataset()
        ds.set_epoch(0, skip_batches=shards[0]["samples"], batch_size=1)
        return list(ds)

    def elastic():  # another run's segment is replayed by sample id only
        ds = dataset()
        ds.set_epoch(0, earlier=[StreamSegment(world=1, workers=1, micro_batch_size=1, batches=[2])])
        return list(ds)

    paths.update(resumed=resumed, elastic=elastic)
    for name, read in paths.items():
        with pytest.raises((CacheCorruptError, RuntimeError), match="sha256"):
            read()


def test_every_key_the_gemma4_loader_reads_holds_the_trained_value(tmp_path):
    """vLLM's Gemma-4 DSpark loader reads the global (full-attention) head size, K=V sharing, the logit cap and the
    draft layers' types: each written out from the tiny Gemma-4 target's construction (tests/test_target_families.py:
    global heads 64 wide, one shared K=V head, cap 2.0) and the drafter's (layers [0, 2], rank 8, 2 layers)."""
    from test_target_families import save_tiny

    from transformers import AutoConfig

    from deepspec.config.data import TargetConfig
    from deepspec.drafters import DSparkConfig, DSparkDrafter
    from deepspec.target import load_frozen_embeddings

    path = save_tiny(tmp_path / "gemma4", "gemma4")
    tcfg = TargetConfig(name_or_path=str(path), layer_ids=[0, 2], dtype="float32", device="cpu", mask_token_id=3)
    embed, head = load_frozen_embeddings(tcfg)
    drafter = DSparkDrafter(DSparkConfig(block_size=3, num_hidden_layers=2, markov_rank=8, target_layer_ids=[0, 2], mask_token_id=3),
                            AutoConfig.from_pretrained(path), embed, head)
    config = json.loads((export_drafter(drafter, tmp_path / "export", target=tcfg) / "config.json").read_text())
    target = json.loads((path / "config.json").read_text())
    expected = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
                "intermediate_size": 128, "rms_norm_eps": target["rms_norm_eps"], "vocab_size": 4096, "global_head_dim": 64,
                "attention_k_eq_v": True, "hidden_activation": target["hidden_activation"],
                "layer_types": ["full_attention", "full_attention"], "rope_parameters": target["rope_parameters"],
                "markov_rank": 8, "target_layer_ids": [0, 2], "final_logit_softcapping": 2.0}
    (read,) = [set(req.config_keys) for req in REQUIREMENTS if req.family == "gemma4"]
    for key in sorted(read | set(expected)):
        assert key in expected, f"the Gemma-4 loader reads {key!r}: add its trained value to expected"
        assert _get(config, key) == expected[key], (key, _get(config, key), expected[key])
