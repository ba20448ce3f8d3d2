"""End-to-end builds as a user runs them: torchrun with 2 ranks, two nodes on localhost, and SIGKILL + resume.

Both compare against an uninterrupted 1-process build of the same input: the manifests must be
equal and every shard byte-identical (same sha256). Single-threaded BLAS in every process, so that
floating-point reductions run in the same order everywhere.
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

from conftest import REPO, launch_two_nodes

pytestmark = pytest.mark.slow


def build_cmd(target: Path, inputs: Path, out_dir: Path, *extra: str) -> list[str]:
    return [str(REPO / "data" / "cache.py"), "build", f"target.name_or_path={target}", "target.layer_ids=[-1,1,3]",
            f"input.paths=[{inputs}]", f"out_dir={out_dir}", "cache.samples_per_shard=6", "cache.rows_per_row_group=3",
            "max_length=192", "min_loss_tokens=4", "batch_size=4", "progress=false", *extra]


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def run_build(cmd: list[str], launcher: list[str] | None = None) -> None:
    proc = subprocess.run((launcher or [sys.executable]) + cmd, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def cache_fingerprint(out_dir: Path) -> dict:
    manifest = json.loads((out_dir / "manifest.json").read_text())
    return {"manifest": manifest, "shards": {s["file"]: (out_dir / s["file"]).read_bytes() for s in manifest["shards"]}}


@pytest.fixture(scope="module")
def reference(tiny_target, chat_jsonl, tmp_path_factory):
    """An uninterrupted single-process build, with and without regeneration."""
    out = {}
    for name, extra in (("plain", ()), ("regen", REGEN)):
        d = tmp_path_factory.mktemp(f"ref_{name}")
        run_build(build_cmd(tiny_target, chat_jsonl, d, *extra))
        out[name] = (d, cache_fingerprint(d))
    return out


REGEN = ("regenerate.enabled=true", "regenerate.max_new_tokens=24", "regenerate.batch_size=4", "regenerate.temperature=1.0")


def test_torchrun_two_ranks_equals_one(tiny_target, chat_jsonl, tmp_path, reference):
    ref_dir, ref = reference["plain"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run_build(build_cmd(tiny_target, chat_jsonl, tmp_path), launcher)
    got = cache_fingerprint(tmp_path)
    assert len(got["shards"]) == 7  # 40 rows / 6 per shard, written by both ranks
    assert got["manifest"] == ref["manifest"]
    assert got["shards"] == ref["shards"]


def test_two_nodes_on_localhost_equal_one_process(tiny_target, chat_jsonl, tmp_path, reference):
    """torchrun --nnodes 2 (two launchers, a c10d rendezvous on localhost) builds the cache one process builds."""
    ref_dir, ref = reference["plain"]
    out = tmp_path / "cache"
    nodes = launch_two_nodes(build_cmd(tiny_target, chat_jsonl, out), child_env(), tmp_path)
    for node, proc in enumerate(nodes):
        assert proc.wait(timeout=600) == 0, (tmp_path / f"node{node}.log").read_text()[-3000:]
    logs = "".join((tmp_path / f"node{node}.log").read_text() for node in (0, 1))
    assert "rank 0: 4 shards" in logs and "rank 1: 3 shards" in logs  # one world of two ranks shared the 7 shards
    got = cache_fingerprint(out)
    assert got["manifest"] == ref["manifest"]
    assert got["shards"] == ref["shards"]


def _kill_when(cmd: list[str], ready, timeout: float = 300) -> None:
    """Start a build and SIGKILL it as soon as ``ready()`` is true."""
    proc = subprocess.Popen([sys.executable] + cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.time()
    while not ready():
        if proc.poll() is not None:
            pytest.fail("the build finished before the kill point was reached; make the kill point earlier")
        if time.time() - start > timeout:
            proc.kill()
            pytest.fail("kill point never reached")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _shards_done(d: Path) -> int:
    return len(list(d.glob("shard-*.parquet")))


@pytest.mark.parametrize("variant", ["plain", "regen"])
def test_sigkill_and_resume_equals_uninterrupted(tiny_target, chat_jsonl, tmp_path, reference, variant):
    ref_dir, ref = reference[variant]
    extra = REGEN if variant == "regen" else ()
    cmd = build_cmd(tiny_target, chat_jsonl, tmp_path, *extra)
    regen_dir = tmp_path / "regenerated"
    if variant == "plain":
        kill_points = [lambda: any(tmp_path.glob("*.parquet.tmp")),  # mid-shard: temporary file open
                       lambda: _shards_done(tmp_path) >= 3]          # between shards
    else:
        kill_points = [lambda: regen_dir.exists() and any(p.stat().st_size > 0 for p in regen_dir.glob("*.jsonl")),  # mid-regeneration
                       lambda: _shards_done(tmp_path) >= 2]
    seen = []
    for ready in kill_points:
        _kill_when(cmd, ready)
        seen.append(_shards_done(tmp_path))
        assert not (tmp_path / "manifest.json").exists()
    assert seen[-1] < 7, "the build was killed after it had finished; the test proves nothing"
    run_build(cmd)
    got = cache_fingerprint(tmp_path)
    assert got["manifest"] == ref["manifest"]
    assert got["shards"] == ref["shards"]
    if variant == "regen":  # the regenerated answers themselves are the same, each id once
        for f in sorted((ref_dir / "regenerated").glob("*.jsonl")):
            ref_rows = {json.loads(l)["id"]: json.loads(l)["messages"] for l in f.read_text().splitlines()}
            got_lines = (regen_dir / f.name).read_text().splitlines()
            got_rows = {json.loads(l)["id"]: json.loads(l)["messages"] for l in got_lines}
            assert got_rows == ref_rows
            assert len(got_lines) == len(got_rows)


def test_independent_parts_like_a_slurm_job_array_equal_one_build(tiny_target, chat_jsonl, tmp_path, reference):
    """Two uncoordinated parts (SLURM_ARRAY_TASK_ID 0 and 1 of 2) fill one cache; the last one writes the manifest."""
    ref_dir, ref = reference["plain"]
    cmd = build_cmd(tiny_target, chat_jsonl, tmp_path)
    for task in (1, 0):  # out of order on purpose
        env = {**child_env(), "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0"}
        proc = subprocess.run([sys.executable] + cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if task == 1:
            assert not (tmp_path / "manifest.json").exists()  # part 0's shards are still missing
            assert sorted(p.name for p in tmp_path.glob("shard-*.parquet")) == [f"shard-{k:06d}.parquet" for k in (1, 3, 5)]
    got = cache_fingerprint(tmp_path)
    assert got["manifest"] == ref["manifest"] and got["shards"] == ref["shards"]
