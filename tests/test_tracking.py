"""W&B without a server: the offline run file read back equals what the stages logged.

* the LevelDB-log reader (deepspec.tracking) recovers every logged value, including records
  split across 32 KiB blocks;
* a real training run with ``wandb.mode=offline``: every row of metrics.jsonl (train and val/) is
  in the W&B history at the same step with the same values; ``disabled`` writes nothing.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, data_config
from deepspec.config.base import WandbConfig
from deepspec.tracking import offline_run_files, read_offline_run, start_wandb_run


def test_reader_recovers_every_logged_value_across_block_boundaries(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = start_wandb_run(WandbConfig(mode="offline", group="g", name="reader"), "train", tmp_path, {"lr": 0.5})
    logged = []
    for step in range(1, 60):
        # 1-3 KiB rows plus a 70 KiB one: records that span two and three blocks.
        row = {"loss": 1.0 / step, "text": "x" * (1000 * (step % 3 + 1) if step != 30 else 70_000), "nested/value": step}
        run.log(row, step=step)
        logged.append(row)
    run.summary["final"] = 7.25
    run.finish()
    (path,) = offline_run_files(tmp_path)
    back = read_offline_run(path)
    assert back["run"]["name"] == "reader" and back["run"]["group"] == "g" and back["run"]["job_type"] == "train"
    assert back["config"]["lr"] == 0.5
    assert [h["_step"] for h in back["history"]] == list(range(1, 60))
    for row, h in zip(logged, back["history"]):
        assert {k: h[k] for k in row} == row
    assert back["summary"]["final"] == 7.25 and back["exit_code"] == 0


@pytest.fixture(scope="module")
def toy_cache(chat_jsonl, tmp_path_factory) -> Path:
    from deepspec.data.build import build_cache

    out = tmp_path_factory.mktemp("toy_cache_wandb")
    build_cache(data_config(Path("toy"), [chat_jsonl], out, input={"max_rows": 12}, max_length=160,
                            target={"layer_ids": [0, 2, 4]}))
    return out


def _train(cache: Path, run_dir: Path, mode: str) -> None:
    cmd = [sys.executable, str(REPO / "train" / "train.py"), "target=toy", f"cache_dir={cache}", f"run_dir={run_dir}",
           "drafter=dspark_debug", "deepspeed.precision=fp32", "deepspeed.zero_stage=0", "logging.progress=false",
           "max_steps=6", "global_batch_size=2", "logging.every_steps=2", "eval.every_steps=3", "eval.val_fraction=0.25",
           "eval.max_samples=4", "checkpoint.every_steps=100", f"wandb.mode={mode}", "wandb.name=metrics-check"]
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true", "DEEPSPEC_AUTO_PRECISION": "fp32", "HOME": str(Path.home())}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_offline_run_holds_exactly_the_trainers_jsonl_metrics(toy_cache, tmp_path):
    _train(toy_cache, tmp_path / "offline", "offline")
    rows = [json.loads(l) for l in (tmp_path / "offline" / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {2, 3, 4, 6} and any("val/expected_tau" in r for r in rows)
    expected: dict[int, dict] = {}
    for r in rows:  # a train row and a val row at one step are one W&B history row
        expected.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k != "step"})
    (path,) = offline_run_files(tmp_path / "offline")
    back = read_offline_run(path)
    assert back["run"]["name"] == "metrics-check" and back["run"]["job_type"] == "train" and back["exit_code"] == 0
    history = {h["_step"]: h for h in back["history"]}
    assert set(history) == set(expected)
    for step, metrics in expected.items():
        assert {k: history[step][k] for k in metrics} == metrics, step
    assert back["config"]["max_steps"] == 6

    _train(toy_cache, tmp_path / "disabled", "disabled")
    assert (tmp_path / "disabled" / "metrics.jsonl").exists() and not (tmp_path / "disabled" / "wandb").exists()
