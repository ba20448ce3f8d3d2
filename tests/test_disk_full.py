"""A full disk stops a stage with one line naming the file, leaves no partial file, and a rerun after freeing
space finishes the cache byte-identical to an uninterrupted build; a read-only output stops every stage in one line
before it starts. Uses real tmpfs mounts (size-limited, read-only; root only, skipped elsewhere)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def mounted_tmpfs(tmp_path: Path, options: str):
    """A tmpfs mounted with ``options`` for the test's duration (skips where mounting is not allowed)."""
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    yield from mounted_tmpfs(tmp_path, "size=1m")


def build(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "DEEPSPEC_AUTO_PRECISION": "fp32"}
    return subprocess.run([sys.executable, "data/cache.py", "build", "target=toy", "input.paths=[deepspec/assets/toy_prompts/train.jsonl]",
                           "input.max_rows=16", "cache.samples_per_shard=4", f"out_dir={out}", "hydra.run.dir=" + str(out.parent / "hydra"),
                           "progress=false"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_disk_full_is_one_line_no_partial_file_and_a_rerun_finishes_identically(small_disk, tmp_path):
    out = small_disk / "cache"
    full = build(out)
    assert full.returncode == 74, full.stderr[-2000:]
    said = full.stdout + full.stderr
    line = next(ln for ln in said.splitlines() if "data stopped: no space left on the device writing" in ln)
    assert str(out) in line and "rerun the same command" in line
    assert "Traceback" not in said, said[-3000:]
    assert not list(out.rglob("*.tmp")), "a partial file was left behind"
    finished = sorted(p.name for p in out.glob("shard-*.parquet"))
    assert not (out / "manifest.json").exists() and len(finished) < 4
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    again = build(out)
    assert again.returncode == 0, again.stderr[-2000:]
    reference = build(tmp_path / "reference")
    assert reference.returncode == 0
    shards = lambda p: [(s["file"], s["sha256"]) for s in json.loads((p / "manifest.json").read_text())["shards"]]
    assert shards(out) == shards(tmp_path / "reference")


@pytest.fixture
def read_only_disk(tmp_path):
    yield from mounted_tmpfs(tmp_path, "ro,size=1m")


@pytest.mark.parametrize("stage,cmd", [
    ("data", ["data/cache.py", "build", "target=toy", "input.paths=[deepspec/assets/toy_prompts/train.jsonl]", "out_dir={out}",
              "hydra.run.dir={out}/hydra"]),
    ("train", ["train/train.py", "cache_dir={out}/cache", "run_dir={out}/run"]),
    ("eval", ["eval/eval.py", "drafter_path={out}/export", "run_dir={out}/eval"]),
])
def test_read_only_output_is_one_line_before_anything_starts(read_only_disk, stage, cmd):
    """Hydra creates the run folder before the stage runs: on a read-only disk that is the first write, and it
    must end like any storage error of the stage (one line, status 74), not with Hydra's traceback."""
    out = read_only_disk / "out"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable] + [c.format(out=out) for c in cmd], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 74, said[-3000:]
    assert f"{stage} stopped before starting: the file system is read-only creating {out}" in said, said[-3000:]
    assert "Traceback" not in said, said[-3000:]
