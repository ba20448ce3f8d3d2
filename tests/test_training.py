"""The trainer end to end on the CPU: DeepSpeed with gloo, as a user launches it.

* torchrun with 2 ranks and ZeRO-2 = 1 process with doubled gradient accumulation;
* a run killed with SIGKILL and resumed = an uninterrupted run (fp32, deterministic);
* a run stopped on 2 ranks and resumed on 1 (and 1 -> 2), ZeRO-0/2/3 = an uninterrupted run;
* two nodes on localhost (torchrun --nnodes 2, c10d): one node SIGKILLed fails the job, a relaunch resumes it to the
  one-process result;
* overfitting a tiny cache drives the expected tau up;
* online mode (target run on the fly) computes the same loss as the offline path;
* export -> load gives identical logits, with and without the frozen embedding/LM head.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, data_config, kill_node, launch_two_nodes

TARGET_ARGS = ["target.layer_ids=[-1,1,3]", "target.mask_token_id=3"]


@pytest.fixture(scope="module")
def tiny_cache(tiny_target, chat_jsonl, tmp_path_factory) -> Path:
    """24 samples, one per row group (so ranks split them deterministically)."""
    from deepspec.data.build import build_cache

    out = tmp_path_factory.mktemp("train_cache")
    cfg = data_config(tiny_target, [chat_jsonl], out, input={"max_rows": 24}, max_length=128,
                      cache={"rows_per_row_group": 1, "samples_per_shard": 6})
    build_cache(cfg)
    return out


def train_cmd(target: Path, cache: Path, run_dir: Path, *extra: str) -> list[str]:
    return [str(REPO / "train" / "train.py"), f"target.name_or_path={target}", *TARGET_ARGS, f"cache_dir={cache}",
            f"run_dir={run_dir}", "drafter=dspark_debug", "deepspeed.precision=fp32", "logging.progress=false",
            "eval.val_fraction=0", "shuffle_buffer=1", "micro_batch_size=1", "optim.lr=3e-3", "optim.warmup_ratio=0.1",
            "checkpoint.keep_last=2", *extra]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}


def run(cmd: list[str], launcher: list[str] | None = None, expect: int = 0, extra_env: dict | None = None) -> None:
    proc = subprocess.run((launcher or [sys.executable]) + cmd, env={**env(), **(extra_env or {})}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == expect, proc.stdout[-4000:] + proc.stderr[-4000:]


def torchrun(ranks: int) -> list[str] | None:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else None


def weights(run_dir: Path) -> dict:
    return load_file(run_dir / "export" / "model.safetensors")


pytestmark = pytest.mark.slow


def test_two_ranks_zero2_equal_one_rank_with_double_accumulation(tiny_target, tiny_cache, tmp_path):
    common = ["max_steps=4", "global_batch_size=2", "checkpoint.every_steps=100"]
    run(train_cmd(tiny_target, tiny_cache, tmp_path / "one", "deepspeed.zero_stage=2", *common))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run(train_cmd(tiny_target, tiny_cache, tmp_path / "two", "deepspeed.zero_stage=2", *common), launcher)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        # Tolerance: the same sums in another order (gradient all-reduce vs accumulation) -> fp32 rounding only.
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-6), (k, (one[k] - two[k]).abs().max())
    logs = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    logs2 = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [round(r["loss"], 4) for r in logs] == [round(r["loss"], 4) for r in logs2]


def test_sigkill_resume_equals_uninterrupted(tiny_target, tiny_cache, tmp_path):
    common = ["max_steps=8", "global_batch_size=2", "checkpoint.every_steps=2", "deepspeed.zero_stage=1"]
    run(train_cmd(tiny_target, tiny_cache, tmp_path / "ref", *common))
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable] + train_cmd(tiny_target, tiny_cache, run_dir, *common), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = run_dir / "checkpoints" / "step_00000004" / "complete"
    start = time.time()
    while not marker.exists():
        assert proc.poll() is None, "training ended before the kill point"
        assert time.time() - start < 600
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "export").exists()
    run(train_cmd(tiny_target, tiny_cache, run_dir, *common))  # resume=auto
    ref, got = weights(tmp_path / "ref"), weights(run_dir)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), (k, (ref[k] - got[k]).abs().max())
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert kept == ["step_00000006", "step_00000008"]  # keep_last=2


@pytest.mark.parametrize("zero_stage, before, after", [(2, 2, 1), (2, 1, 2), (3, 2, 1), (0, 1, 2)])
def test_resume_on_another_number_of_ranks_equals_an_uninterrupted_run(tiny_target, tiny_cache, tmp_path, zero_stage,
                                                                        before, after):
    """Elastic resume: stopped (a preemption's stop file) after step 1 on ``before`` ranks, finished on ``after``.
    One sample per row group and no shuffle buffer make the sample order of a step independent of the rank count,
    so the run must equal an uninterrupted one: the same per-step losses (a sample seen twice or skipped changes a
    loss) and the same weights up to fp32 summation order (the optimizer state survived the re-partitioning)."""
    from deepspec.training.preemption import PREEMPTED_EXIT_CODE

    common = ["max_steps=4", "global_batch_size=2", "checkpoint.every_steps=100", f"deepspeed.zero_stage={zero_stage}"]
    run(train_cmd(tiny_target, tiny_cache, tmp_path / "ref", *common))
    run_dir, stop_file = tmp_path / "elastic", tmp_path / "stop"
    stop_file.touch()
    # torchrun reports its workers' "preempted" status 75 as a failure (1)
    run(train_cmd(tiny_target, tiny_cache, run_dir, *common), torchrun(before), expect=PREEMPTED_EXIT_CODE if before == 1 else 1,
        extra_env={"DEEPSPEC_STOP_FILE": str(stop_file)})
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000001"]
    run(train_cmd(tiny_target, tiny_cache, run_dir, *common), torchrun(after))
    ref, got = weights(tmp_path / "ref"), weights(run_dir)
    for k in ref:
        assert torch.allclose(ref[k], got[k], rtol=1e-4, atol=1e-6), (k, (ref[k] - got[k]).abs().max())
    losses = [[round(json.loads(l)["loss"], 4) for l in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
              for d in (tmp_path / "ref", run_dir)]
    assert losses[0] == losses[1]
    assert not (run_dir / "checkpoints" / "universal").exists()  # the conversion is dropped once a checkpoint is saved


def test_two_nodes_on_localhost_a_killed_node_fails_the_job_and_a_relaunch_resumes_it(tiny_target, tiny_cache, tmp_path):
    # 200 steps (17 epochs of the 24 samples): the kill lands mid-run even when this process polls late on a busy machine
    common = ["max_steps=200", "global_batch_size=2", "checkpoint.every_steps=4", "checkpoint.keep_last=100",
              "deepspeed.zero_stage=2", "logging.every_steps=1"]
    run(train_cmd(tiny_target, tiny_cache, tmp_path / "ref", *common))  # one process, accumulation 2
    run_dir = tmp_path / "two_nodes"
    cmd = train_cmd(tiny_target, tiny_cache, run_dir, *common)
    nodes = launch_two_nodes(cmd, env(), tmp_path)
    start = time.time()
    while not list((run_dir / "checkpoints").glob("step_*/complete")):
        assert all(p.poll() is None for p in nodes), "a node ended before the kill point"
        assert time.time() - start < 600
        time.sleep(0.02)
    kill_node(nodes[1])  # its launcher and its worker, as when a host dies
    killed_at = time.time()
    status = nodes[0].wait(timeout=300)  # the surviving node must not hang on its dead peer
    failed_within = time.time() - killed_at
    assert status != 0 and not (run_dir / "export").exists(), "the job was not interrupted"
    assert not (run_dir / "checkpoints" / "step_00000200").exists()
    print(f"the surviving node failed {failed_within:.1f} s after its peer was killed")
    assert "stopped: another rank of this job died" in (tmp_path / "node0.log").read_text()  # one line, no traceback of ours

    nodes = launch_two_nodes(cmd, env(), tmp_path, tag="relaunch")  # as a requeue would: resume=auto
    for node, proc in enumerate(nodes):
        assert proc.wait(timeout=600) == 0, (tmp_path / f"relaunch{node}.log").read_text()[-3000:]
    assert "RESUME: resuming from" in "".join((tmp_path / f"relaunch{n}.log").read_text() for n in (0, 1))
    ref, got = weights(tmp_path / "ref"), weights(run_dir)
    for k in ref:  # tolerance: gradient all-reduce vs accumulation sums in another order (fp32 rounding only)
        assert torch.allclose(ref[k], got[k], rtol=1e-4, atol=1e-6), (k, (ref[k] - got[k]).abs().max())
    losses = [[round(json.loads(l)["loss"], 4) for l in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
              for d in (tmp_path / "ref", run_dir)]
    assert losses[1][-len(losses[0]):] == losses[0][-len(losses[1][-len(losses[0]):]):]


@pytest.fixture(scope="module")
def toy_cache(chat_jsonl, tmp_path_factory) -> Path:
    """16 samples cached from the embedded toy target (a trained model: peaked, learnable distributions)."""
    from deepspec.data.build import build_cache

    out = tmp_path_factory.mktemp("toy_cache")
    cfg = data_config(Path("toy"), [chat_jsonl], out, input={"max_rows": 16}, max_length=192,
                      target={"layer_ids": [0, 2, 4]}, cache={"rows_per_row_group": 2})
    build_cache(cfg)
    return out


def test_overfitting_a_tiny_cache_drives_expected_tau_up(toy_cache, tmp_path):
    cmd = [str(REPO / "train" / "train.py"), "target=toy", f"cache_dir={toy_cache}", f"run_dir={tmp_path}",
           "drafter=dspark_debug", "deepspeed.precision=fp32", "deepspeed.zero_stage=0", "logging.progress=false",
           "eval.val_fraction=0", "max_steps=150", "global_batch_size=4", "micro_batch_size=2", "optim.lr=3e-3",
           "logging.every_steps=10", "checkpoint.every_steps=1000", "wandb.mode=offline"]
    run(cmd)
    logs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["expected_tau"] for r in logs[:2]) / 2
    last = sum(r["expected_tau"] for r in logs[-2:]) / 2
    assert last > first + 0.3, [round(r["expected_tau"], 2) for r in logs]
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))  # W&B offline wrote its run file


def test_a_stale_extension_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """A killed DeepSpeed op build leaves torch's cpp_extension lock; every later start would wait on it forever."""
    import os
    import time

    from deepspec.training.engine import clear_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, fresh = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock", tmp_path / "py311_cpu" / "other_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert clear_stale_build_locks() == [str(stale)]
    assert not stale.exists() and fresh.exists()
