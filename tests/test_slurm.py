"""The slurm/ templates, the Hydra submitit launcher and preemption, on a real Slurm cluster.

CI starts a one-node cluster on localhost (scripts/start_local_slurm.sh); without ``sbatch`` on
PATH (or without a reachable controller) these tests are skipped. Jobs run the embedded toy target
on the CPU with 2 ranks per "node", as on a GPU node with 2 GPUs.

* the data template as a 2-task job and as a 2-task array: the manifest lists every shard exactly
  once, and the shards equal a single-process build byte for byte;
* the train template runs a 2-process torchrun job (c10d rendezvous) to completion;
* ``scancel`` mid-way, then resubmitting, resumes from the checkpoint and ends with the weights
  of the uninterrupted job (bitwise, fp32);
* the time-limit warning (USR1 to the batch shell) checkpoints, requeues and resumes, again to
  the same weights;
* ``deepspec-train -m ... hydra/launcher=submitit_slurm`` trains two configurations;
* slurm/pipeline.sh chains data (array) -> train -> eval, with one W&B group for the three runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, slurm_cluster_up, write_jsonl


pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(not slurm_cluster_up(), reason="needs a Slurm cluster (sbatch on PATH; scripts/start_local_slurm.sh)")]

TRAIN_ARGS = ["target=toy", "drafter=dspark_debug", "deepspeed.precision=fp32", "deepspeed.zero_stage=1",
              "logging.progress=false", "eval.val_fraction=0", "shuffle_buffer=1", "global_batch_size=2",
              "optim.lr=3e-3", "checkpoint.every_steps=2"]


def job_env(**extra: str) -> dict:
    """The submitting environment (sbatch exports it): this venv's python first on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "DEEPSPEC_ROOT": str(REPO)}
    env.pop("WANDB_MODE", None)
    return {**env, **extra}


def sbatch(*args: str, env: dict | None = None) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO, env=env or job_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def run_job(*args: str, env: dict | None = None) -> str:
    """sbatch and wait for the job to leave the queue (polling: `sbatch --wait` polls every 30 s or so)."""
    job = sbatch(*args, env=env)
    wait_gone(job)
    return job


def job_field(job: str, key: str) -> str | None:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    for token in out.split():
        if token.startswith(key + "="):
            return token.split("=", 1)[1]
    return None


def wait_gone(job: str, timeout: float = 600) -> None:
    """Wait until the job (all array tasks) leaves the queue, requeues included. (A requeued job
    starts again once its old credential expires: 10 s on the CI cluster, AuthInfo=cred_expire.)"""
    start = time.time()
    while True:
        states = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.split()
        if not states:  # left the queue; accounting (slurmdbd) may lag by a moment
            while set(final_states(job)) & {"PENDING", "RUNNING", "REQUEUED", "COMPLETING"} or not final_states(job):
                assert time.time() - start < timeout + 60, f"job {job}: sacct says {final_states(job)}"
                time.sleep(0.5)
            return
        assert time.time() - start < timeout, f"job {job} still {states} after {timeout}s"
        time.sleep(1)


def final_states(job: str) -> list[str]:
    """sacct states of the job's allocations (array tasks included), steps excluded."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]  # "CANCELLED by 0" -> CANCELLED


def log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    lines = (REPO / "deepspec/assets/toy_prompts/train.jsonl").read_text().splitlines()[:24]
    return write_jsonl(tmp_path_factory.mktemp("rows") / "rows.jsonl", [json.loads(l) for l in lines])


def data_args(rows: Path, out_dir: Path) -> list[str]:
    return ["target=toy", f"input.paths=[{rows}]", f"out_dir={out_dir}", "max_length=192", "cache.samples_per_shard=3",
            "progress=false"]


@pytest.fixture(scope="module")
def cache(rows, tmp_path_factory) -> Path:
    """A toy-target cache built by one plain process: the reference for the Slurm builds."""
    out = tmp_path_factory.mktemp("cache")
    proc = subprocess.run([sys.executable, "-m", "deepspec.data.cli", "build", *data_args(rows, out)], cwd=REPO,
                          env=job_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def shard_digests(cache_dir: Path) -> dict[str, str]:
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    files = [s["file"] for s in manifest["shards"]]
    assert len(files) == len(set(files)) == manifest["num_shards"], files  # every shard exactly once
    return {s["file"]: s["sha256"] for s in manifest["shards"]}


@pytest.mark.parametrize("layout,allocations", [("--ntasks=2", 1), ("--array=0-1", 2)], ids=["two_tasks", "array"])
def test_data_template_parts_fill_one_cache(layout, allocations, rows, cache, tmp_path):
    out = tmp_path / "cache"
    job = run_job(layout, f"--output={tmp_path}/slurm-%j.out", "slurm/data.sbatch", *data_args(rows, out))
    logs = "\n".join(log(p) for p in tmp_path.glob("slurm-*.out"))
    assert final_states(job) == ["COMPLETED"] * allocations, logs[-4000:]
    assert "part 0 of 2: shards [0, 2, 4, 6]" in logs and "part 1 of 2: shards [1, 3, 5, 7]" in logs, logs[-4000:]
    assert shard_digests(out) == shard_digests(cache)
    verify = subprocess.run([sys.executable, "-m", "deepspec.data.cli", "verify", f"out_dir={out}", "target=toy"], cwd=REPO,
                            env=job_env(), capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout[-2000:] + verify.stderr[-2000:]


def weights(run_dir: Path) -> dict:
    return load_file(run_dir / "export" / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), (k, (wa[k] - wb[k]).abs().max())


@pytest.fixture(scope="module")
def reference_run(cache, tmp_path_factory) -> Path:
    """An uninterrupted 2-process job of the train template."""
    run_dir = tmp_path_factory.mktemp("train_ref") / "run"
    out = run_dir.parent / "slurm.out"
    job = run_job(f"--output={out}", "slurm/train.sbatch", *TRAIN_ARGS, f"cache_dir={cache}", f"run_dir={run_dir}",
                 "max_steps=40", env=job_env(DEEPSPEC_GPUS_PER_NODE="2"))
    assert final_states(job) == ["COMPLETED"], log(out)[-4000:]
    return run_dir


def test_train_template_runs_two_processes(reference_run):
    info = json.loads((reference_run / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["slurm_job_id"]
    assert json.loads((reference_run / "result.json").read_text())["step"] == 40
    assert (reference_run / "export" / "model.safetensors").exists()


def _wait_for_checkpoint(run_dir: Path, step: int, job: str, out: Path) -> None:
    marker = run_dir / "checkpoints" / f"step_{step:08d}" / "complete"
    start = time.time()
    while not marker.exists():
        assert final_states(job) in ([], ["RUNNING"], ["PENDING"]), log(out)[-4000:]
        assert time.time() - start < 600, log(out)[-4000:]
        time.sleep(0.2)


def test_scancel_then_resubmit_resumes_to_the_same_weights(cache, reference_run, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "slurm.out"
    args = ["slurm/train.sbatch", *TRAIN_ARGS, f"cache_dir={cache}", f"run_dir={run_dir}", "max_steps=40"]
    job = sbatch(f"--output={out}", *args, env=job_env(DEEPSPEC_GPUS_PER_NODE="2"))
    _wait_for_checkpoint(run_dir, 2, job, out)
    subprocess.run(["scancel", job], check=True)
    wait_gone(job)
    assert final_states(job) == ["CANCELLED"] and not (run_dir / "export").exists(), "the job finished before scancel"
    saved = sorted(p.parent.name for p in (run_dir / "checkpoints").glob("step_*/complete"))
    job2 = run_job(f"--output={out}", *args, env=job_env(DEEPSPEC_GPUS_PER_NODE="2"))
    assert final_states(job2) == ["COMPLETED"], log(out)[-4000:]
    assert f"RESUME: resuming from {run_dir / 'checkpoints' / saved[-1]}" in log(out)
    assert_same_weights(reference_run, run_dir)


def test_time_limit_signal_checkpoints_requeues_and_resumes(cache, reference_run, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "slurm.out"
    job = sbatch(f"--output={out}", "slurm/train.sbatch", *TRAIN_ARGS, f"cache_dir={cache}", f"run_dir={run_dir}",
                 "max_steps=40", "checkpoint.every_steps=100", "logging.every_steps=1", env=job_env(DEEPSPEC_GPUS_PER_NODE="2"))
    # No periodic checkpoint before the end: the one the job resumes from is the one the signal made.
    start = time.time()
    while len(log(run_dir / "metrics.jsonl").splitlines()) < 3:  # a few steps in
        assert final_states(job) in ([], ["RUNNING"], ["PENDING"]) and time.time() - start < 600, log(out)[-4000:]
        time.sleep(0.1)
    # What Slurm sends --signal=B:USR1@300 before the time limit, sent now.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    wait_gone(job)
    text = log(out)
    assert final_states(job) == ["COMPLETED"], text[-4000:]
    assert "PREEMPT: stop requested (stop file" in text and "requeueing job" in text, text[-4000:]
    assert int(job_field(job, "Restarts") or 0) >= 1
    resumed = [l for l in text.splitlines() if "RESUME: resuming from" in l]
    assert resumed, text[-4000:]
    assert_same_weights(reference_run, run_dir)


def test_hydra_multirun_through_submitit_slurm_trains_two_configs(cache, tmp_path):
    cmd = [sys.executable, "-m", "deepspec.training.cli", "-m", "drafter=dspark_debug,dflash_debug",
           "hydra/launcher=submitit_slurm", "hydra.launcher.cpus_per_task=1", *[a for a in TRAIN_ARGS if not a.startswith("drafter=")],
           f"cache_dir={cache}", f"run_dir={tmp_path}", "max_steps=2"]
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "validated against ConfigStore schema" not in proc.stderr
    (sweep,) = (tmp_path / "multirun").iterdir()
    trained = {}
    for job_dir in sorted(p for p in sweep.iterdir() if p.name.isdigit()):
        info = json.loads((job_dir / "run_info.json").read_text())
        assert info["slurm_job_id"] and info["config"]["run_dir"] == str(job_dir)
        assert json.loads((job_dir / "result.json").read_text())["step"] == 2
        overrides = (job_dir / ".hydra" / "overrides.yaml").read_text()
        trained[info["config"]["drafter"]["name"]] = overrides
        assert (job_dir / "export" / "model.safetensors").exists()
    assert set(trained) == {"dspark", "dflash"}
    assert "drafter=dspark_debug" in trained["dspark"] and "drafter=dflash_debug" in trained["dflash"]


def test_pipeline_chains_data_train_eval_in_one_wandb_group(rows, cache, tmp_path):
    from deepspec.tracking import offline_run_files, read_offline_run

    run = tmp_path / "pipe"
    cmd = ["bash", "slurm/pipeline.sh", "--run-dir", str(run), "--name", "ci-pipe", "--data-parts", "2", "--ranks-per-node", "2",
           "--data", f"input.paths=[{rows}]", "max_length=192", "cache.samples_per_shard=3",
           "--train", *[a for a in TRAIN_ARGS if a != "target=toy"], "max_steps=4",
           "--eval", "datasets=[{name:heldout,path:deepspec/assets/toy_prompts/heldout.jsonl,max_prompts:2}]",
           "max_new_tokens=12", "peers=false", "serving_loads=[1,2]", "sps_max_tokens=8"]
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(WANDB_MODE="offline"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    data, train, evaluation = proc.stdout.split()
    for job in (data, train, evaluation):
        wait_gone(job)
    logs = "\n".join(log(p)[-3000:] for p in run.glob("slurm-*.out"))
    assert final_states(data) == ["COMPLETED"] * 2 and final_states(train) == final_states(evaluation) == ["COMPLETED"], logs
    manifest = json.loads((run / "cache" / "manifest.json").read_text())
    assert shard_digests(run / "cache") == shard_digests(cache)
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["datasets"]["heldout"]["greedy"]["greedy_identical_to_plain"]
    runs = {}
    for stage, folder in (("data", "cache"), ("train", "train"), ("eval", "eval")):
        (path,) = offline_run_files(run / folder)
        runs[stage] = read_offline_run(path)
        assert runs[stage]["run"]["group"] == "ci-pipe" and runs[stage]["run"]["job_type"] == stage
        assert runs[stage]["run"]["name"] == f"ci-pipe-{stage}" and runs[stage]["exit_code"] == 0
    assert runs["data"]["summary"]["data/samples"] == manifest["counts"]["samples"]
    assert runs["data"]["summary"]["data/shards"] == manifest["num_shards"]
    assert runs["eval"]["summary"]["heldout/sampled/tau"] == results["datasets"]["heldout"]["sampled"]["tau"]
    assert {"plots/acceptance_by_position/path", "eval/summary/nrows"} <= set(runs["eval"]["history"][0])
