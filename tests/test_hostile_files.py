"""Files that may come from elsewhere never run code: a pickled payload in a checkpoint is refused
before anything unpickles it; the trainer's own state is JSON + safetensors."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from deepspec.training.checkpoint import (MARKER, CheckpointManager, UnsafeCheckpointError, check_no_code,
                                          load_trainer_state, save_trainer_state)


class Payload:
    """Unpickling this calls Path.touch(target): the code a hostile checkpoint would run."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def hostile_checkpoint(tmp_path: Path, file: str) -> tuple[Path, Path]:
    step = tmp_path / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}}, step / "mp_rank_00_model_states.pt")
    pwned = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": {"loss_scaler": Payload(pwned)}}, step / file)
    (step / MARKER).write_text("2")
    return step, pwned


@pytest.mark.parametrize("file", ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "trainer_state_rank0.pt"])
def test_a_pickle_payload_in_a_checkpoint_is_refused_before_it_runs(tmp_path, file):
    step, pwned = hostile_checkpoint(tmp_path, file)
    with pytest.raises(UnsafeCheckpointError, match=file):
        CheckpointManager(tmp_path, 3, 0).load(engine=None, path=step, saved_ranks=1)  # refused before DeepSpeed sees it
    assert not pwned.exists()
    with pytest.raises(UnsafeCheckpointError, match="Unsupported global"):
        check_no_code(step)


def test_deepspeed_data_and_allow_listed_classes_pass():
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    import tempfile
    with tempfile.TemporaryDirectory() as d:
        torch.save({"loss_scaler": LossScaler(1.0), "state": {0: {"exp_avg": torch.ones(3)}}, "lr": [1e-3]},
                   Path(d) / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        check_no_code(Path(d))


def test_trainer_state_round_trips_without_pickle(tmp_path):
    torch.manual_seed(3), random.seed(4), np.random.seed(5)
    save_trainer_state(tmp_path, 0, {"step": 7, "best_tau": 1.5, "position": {"epoch": 1, "index": 9}})
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()  # move every generator on
    state = load_trainer_state(tmp_path, 0)
    assert state == {"step": 7, "best_tau": 1.5, "position": {"epoch": 1, "index": 9}}
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".safetensors"]


@pytest.mark.parametrize("file", ["../outside/shard-000000.parquet", "/etc/passwd", "sub/shard-000000.parquet", "..", "", None])
def test_a_manifest_cannot_point_outside_the_cache(tmp_path, file):
    import json

    from deepspec.data.cache.manifest import FORMAT_VERSION, MANIFEST, load_manifest

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "shards": [{"index": 0, "file": file}]}))
    with pytest.raises(ValueError, match="shard 0: file .* is not a plain file name inside the cache"):
        load_manifest(cache)


def test_a_symlinked_shard_leading_out_of_the_cache_is_refused(tmp_path):
    import json

    from deepspec.data.cache.manifest import FORMAT_VERSION, MANIFEST, load_manifest

    cache, outside = tmp_path / "cache", tmp_path / "secret.parquet"
    cache.mkdir()
    outside.write_bytes(b"not yours")
    (cache / "shard-000000.parquet").symlink_to(outside)
    (cache / "shard-000001.parquet").write_bytes(b"ok")
    (cache / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "shards": [
        {"index": 1, "file": "shard-000001.parquet"}, {"index": 0, "file": "shard-000000.parquet"}]}))
    with pytest.raises(ValueError, match="shard 0: shard-000000.parquet is a symlink to .*secret.parquet, outside the cache"):
        load_manifest(cache)
    (cache / "shard-000000.parquet").unlink()
    (cache / "shard-000000.parquet").symlink_to(cache / "shard-000001.parquet")  # a link inside the cache is fine
    assert len(load_manifest(cache)["shards"]) == 2


def test_remote_code_is_off_by_default_and_logged_when_on(tiny_target, caplog):
    import logging

    from deepspec.config.data import TargetConfig
    from deepspec.target import load_tokenizer

    assert TargetConfig().trust_remote_code is False
    with caplog.at_level(logging.WARNING, logger="deepspec.target"):
        load_tokenizer(TargetConfig(name_or_path=str(tiny_target)))
        assert not caplog.records
        load_tokenizer(TargetConfig(name_or_path=str(tiny_target), trust_remote_code=True))
    assert "trust_remote_code=true: transformers will run the Python code shipped with" in caplog.records[0].getMessage()
