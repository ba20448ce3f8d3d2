"""Build -> read round trips: what the reader returns is what the target computes, within the codec's error.

Every (format, storage dtype) pair builds one small cache (16 rows, 8 per shard). The test then
recomputes each sample independently (one sample per forward, no padding), and compares. Batched
and unbatched fp32 forwards differ by rounding noise only; BATCH_ATOL/BATCH_RTOL below bound it.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import data_config

from deepspec.data import build as build_mod
from deepspec.data.build import build_cache
from deepspec.data.cache import quantize
from deepspec.data.cache.reader import TargetCacheDataset
from deepspec.data.cache.records import CacheRecord, RecordCodec
from deepspec.data.cache.shards import WRITERS, commit_file, read_shard
from deepspec.integrity import sha256_file
from deepspec.data.chat import render_sample
from deepspec.data.sources import Sample, iter_raw_rows, parse_row
from deepspec.target import TargetModel, load_tokenizer

FORMATS = ("parquet", "webdataset")
DTYPES = ("bf16", "fp16", "fp8", "int8")
TOPK_COMBOS = {("parquet", "int8"), ("webdataset", "fp16")}
ROWS = 16
MAX_LEN = 128  # rows are truncated: shorter forwards, and truncation is part of what is checked
# Padding/batching changes fp32 results of the tiny target by rounding noise only.
BATCH_ATOL, BATCH_RTOL = 1e-4, 1e-4
BLOBS = ("hidden", "hidden_scale", "final_hidden", "final_scale", "topk_ids", "topk_logprobs")


def _codec_bound(ref: torch.Tensor, dt: str) -> torch.Tensor:
    """Documented storage error for each element of ref (..., d): rows are the last dim."""
    a = ref.abs()
    if dt == "bf16":
        return 2.0 ** -8 * a
    if dt == "fp16":
        return 2.0 ** -11 * a + 2.0 ** -25
    scale = a.amax(-1, keepdim=True) / (448.0 if dt == "fp8" else 127.0)
    return 2.0 ** -4 * a + scale * 2.0 ** -10 if dt == "fp8" else scale / 2


def _assert_close_to_reference(cached: torch.Tensor, ref: torch.Tensor, dt: str, what: str):
    """cached == codec(ref') for some ref' within batching noise of ref."""
    bound = _codec_bound(ref, dt) * (1 + BATCH_RTOL) + BATCH_ATOL + BATCH_RTOL * ref.abs()
    err = (cached - ref).abs()
    assert (err <= bound).all(), f"{what}: max excess {(err - bound).max().item():.3g}"
    # Stronger: nearly every element is the codec's encoding of the recomputed tensor (same code; a row's fp32
    # scale may move by an ulp with the batching noise of the row's absmax, hence the 1e-5 relative slack).
    same = torch.isclose(cached, _codec_roundtrip(ref, dt), rtol=1e-5, atol=1e-7).float().mean().item()
    assert same >= 0.99, f"{what}: only {same:.4f} of elements match the encoding of the recomputed tensor"


def _codec_roundtrip(x: torch.Tensor, dt: str) -> torch.Tensor:
    shape = (x.shape[0], 1, x.shape[-1]) if x.dim() == 2 else tuple(x.shape)
    v, s = quantize.encode(x.reshape(shape), dt)
    return quantize.decode(v, s, shape, dt).reshape(x.shape)


@pytest.fixture(scope="module")
def rows_cfg(tiny_target, chat_jsonl, tmp_path_factory):
    return data_config(tiny_target, [chat_jsonl], tmp_path_factory.mktemp("unused"), input={"max_rows": ROWS}, max_length=MAX_LEN)


@pytest.fixture(scope="module")
def target_model(rows_cfg):
    return TargetModel.from_config(rows_cfg.target)


@pytest.fixture(scope="module")
def expected(rows_cfg):
    """sample_id -> RenderedSample, for the rows a build must keep (recomputed from the input)."""
    tok = load_tokenizer(rows_cfg.target)
    out, dropped = {}, 0
    for raw in iter_raw_rows(rows_cfg.input):
        s = parse_row(raw)
        assert isinstance(s, Sample)
        r = render_sample(tok, s, rows_cfg.max_length)
        if r.loss_tokens >= rows_cfg.min_loss_tokens:
            assert r.sample_id not in out
            out[r.sample_id] = r
        else:
            dropped += 1
    assert len(out) >= ROWS - 3, "the test needs most rows to be kept"
    return out, dropped


@pytest.fixture(scope="module")
def reference(expected, target_model):
    """sample_id -> (layer hidden (S, L*d), final hidden (S, d), next-token log-probs (S, V)): one unpadded
    forward per sample, on the target's device, results on the CPU."""
    out = {}
    for sid, r in expected[0].items():
        ids = r.input_ids[None].to(target_model.device)
        layer, final = target_model(ids, torch.ones_like(ids))
        logp = torch.log_softmax(target_model.lm_head(final[0]).float(), dim=-1)
        out[sid] = (layer[0].float().cpu(), final[0].float().cpu(), logp.cpu())
    return out


class _RecordingWriter:
    """Wraps a real shard writer and remembers every record handed to it, per shard file."""

    written: dict[str, list[CacheRecord]] = {}

    def __init__(self, real_cls, path, metadata, **kw):
        self._real = real_cls(path, metadata, **kw)
        self.tmp = self._real.tmp
        self.written[Path(path).name] = self._records = []

    def write(self, rec):
        self._records.append(rec)
        self._real.write(rec)

    def finish(self):
        return self._real.finish()


def _assert_same_record(a: CacheRecord, b: CacheRecord):
    assert a.sample_id == b.sample_id
    assert a.input_ids.dtype == b.input_ids.dtype == np.int32 and np.array_equal(a.input_ids, b.input_ids)
    assert a.loss_mask.dtype == b.loss_mask.dtype == np.uint8 and np.array_equal(a.loss_mask, b.loss_mask)
    for f in BLOBS:
        assert bytes(getattr(a, f)) == bytes(getattr(b, f)), f"{a.sample_id}: field {f} differs"


@pytest.mark.parametrize("fmt,dt", list(itertools.product(FORMATS, DTYPES)))
def test_build_read_matches_recomputed_target(fmt, dt, tiny_target, chat_jsonl, tmp_path, target_model, expected,
                                              reference, monkeypatch):
    exp, dropped = expected
    topk = 3 if (fmt, dt) in TOPK_COMBOS else 0
    _RecordingWriter.written = {}
    real = WRITERS[fmt]
    monkeypatch.setitem(build_mod.WRITERS, fmt, lambda path, meta, **kw: _RecordingWriter(real, path, meta, **kw))
    cfg = data_config(tiny_target, [chat_jsonl], tmp_path / "cache", input={"max_rows": ROWS}, max_length=MAX_LEN,
                      cache={"format": fmt, "storage_dtype": dt, "topk_logprobs": topk})
    manifest = build_cache(cfg)

    assert manifest["num_shards"] == 2 and manifest["counts"]["rows"] == ROWS
    assert manifest["counts"]["samples"] == len(exp) and manifest["counts"]["dropped_short"] == dropped
    assert manifest["counts"]["tokens"] == sum(len(r.input_ids) for r in exp.values())

    # Every record the build handed to a writer reads back byte for byte, in the same order.
    files = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith("shard-") and
                   p.suffix in (".parquet", ".tar"))
    assert files == sorted(_RecordingWriter.written) and len(files) == 2
    for name in files:
        back = list(read_shard(tmp_path / "cache" / name, fmt))
        assert len(back) == len(_RecordingWriter.written[name])
        for a, b in zip(_RecordingWriter.written[name], back):
            _assert_same_record(a, b)

    got = list(TargetCacheDataset(tmp_path / "cache", shuffle=False, prefetch=0))
    assert sorted(s["sample_id"] for s in got) == sorted(exp)
    L, d = 3, target_model.config.hidden_size
    for s in got:
        r = exp[s["sample_id"]]
        assert torch.equal(s["input_ids"], r.input_ids)
        assert torch.equal(s["loss_mask"], r.loss_mask)
        S = len(r.input_ids)
        layer_ref, final_ref, logp_ref = reference[s["sample_id"]]  # (S, L*d), (S, d), (S, V)
        assert s["hidden"].shape == (S, L * d)
        _assert_close_to_reference(s["hidden"].view(S, L, d), layer_ref.view(S, L, d), dt, f"{s['sample_id']} hidden")
        # Layer -1 (the embedding output) does not depend on batching at all: it must be exact.
        assert torch.equal(s["hidden"].view(S, L, d)[:, 0], _codec_roundtrip(layer_ref.view(S, L, d)[:, :1], dt)[:, 0])

        pos = torch.tensor([p for p in range(S - 1) if r.loss_mask[p + 1] == 1], dtype=torch.long)
        assert torch.equal(s["final_positions"], pos)
        assert s["final_hidden"].shape == (S, d)
        off = torch.ones(S, dtype=torch.bool)
        off[pos] = False
        assert (s["final_hidden"][off] == 0).all()
        _assert_close_to_reference(s["final_hidden"][pos], final_ref[pos], dt, f"{s['sample_id']} final_hidden")

        if topk:
            logp = logp_ref[pos]  # (P, V)
            assert s["topk_ids"].shape == s["topk_logprobs"].shape == (len(pos), topk)
            assert (s["topk_logprobs"][:, :-1] >= s["topk_logprobs"][:, 1:]).all()
            torch.testing.assert_close(s["topk_logprobs"], logp.gather(1, s["topk_ids"]), atol=1e-4, rtol=0)
            torch.testing.assert_close(s["topk_logprobs"], logp.topk(topk, dim=-1).values, atol=1e-4, rtol=0)
        else:
            assert "topk_ids" not in s


def _random_records(codec: RecordCodec, n: int, seed: int) -> list[CacheRecord]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        S = int(torch.randint(2, 40, (1,), generator=g))
        ids = torch.randint(0, 4096, (S,), generator=g)
        mask = (torch.rand(S, generator=g) < 0.5).to(torch.uint8)
        if i % 4 == 0:
            mask.zero_()  # no supervised position: empty final/top-k blobs
        layer = torch.randn(S, codec.num_layers * codec.hidden_size, generator=g) * (10.0 ** (i % 5 - 2))
        final = torch.randn(S, codec.hidden_size, generator=g)
        P = int(mask[1:].sum())
        topk = None
        if codec.topk:
            topk = (torch.randint(0, 4096, (P, codec.topk), generator=g), -torch.rand(P, codec.topk, generator=g) * 10)
        out.append(codec.encode(f"sample-{seed}-{i}", ids, mask, layer, final, topk))
    return out


@pytest.mark.parametrize("topk", [0, 2])
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_writer_reader_bytes_identical(fmt, dt, topk, tmp_path):
    codec = RecordCodec(dt, num_layers=2, hidden_size=16, topk=topk)
    records = _random_records(codec, 11, seed=hash((fmt, dt, topk)) % 1000)
    meta = {"storage_dtype": dt, "num_layers": 2, "hidden_size": 16, "topk_logprobs": topk}
    digests = []
    for run in range(2):
        path = tmp_path / f"run{run}" / ("shard-000000" + (".parquet" if fmt == "parquet" else ".tar"))
        path.parent.mkdir()
        w = WRITERS[fmt](path, meta, rows_per_row_group=3, compression="zstd")
        for rec in records:
            w.write(rec)
        commit_file(w.finish(), path)
        assert not Path(str(path) + ".tmp").exists()
        back = list(read_shard(path, fmt))
        assert len(back) == len(records)
        for a, b in zip(records, back):
            _assert_same_record(a, b)
            if topk and not a.loss_mask[1:].any():
                continue  # decoding a top-k record without supervised positions is a known bug, tested below
            da, db = codec.decode(a), codec.decode(b)
            for k in da:
                if isinstance(da[k], torch.Tensor):
                    assert torch.equal(da[k], db[k]), k
        digests.append(sha256_file(path))
    assert digests[0] == digests[1], "the same records must give the same shard bytes"


def test_decode_topk_record_without_supervised_positions():
    codec = RecordCodec("bf16", num_layers=1, hidden_size=8, topk=2)
    mask = torch.tensor([1, 0, 0], dtype=torch.uint8)  # one loss token, but no position predicts it
    rec = codec.encode("x", torch.tensor([5, 6, 7]), mask, torch.randn(3, 8), torch.randn(3, 8),
                       (torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2)))
    out = codec.decode(rec)
    assert out["topk_ids"].shape == out["topk_logprobs"].shape == (0, 2)
