#!/usr/bin/env python
"""Random-kill campaigns: SIGKILL a stage at random times, resume it, and check that what it finally
writes equals an uninterrupted run's (issue 14, item 1).

For each stage: build a tiny workload (a random 4-layer Qwen3 target, 40 toy prompts), run it once
uninterrupted (the reference, timed), then repeat rounds until ``--kills`` kills have been delivered:
a round starts the stage on an empty output folder, SIGKILLs it at a random time, starts the same
command again (it resumes: the data build skips published shards, training takes ``resume=auto``),
kills it again, ... until one run finishes, and compares the result with the reference:

* data stages: manifest equal, every shard byte-identical (and, with regeneration, the same answers);
* training: every tensor of the export ``torch.equal`` (fp32 on the CPU, one BLAS thread: deterministic).

A kill takes the whole process tree at once (SIGSTOP to freeze it, then SIGKILL to every process and
process group), as a node failure or a Slurm job kill does. killpg on the launcher's group alone is not
enough: torchrun starts each worker in a session of its own, and orphaned workers would go on writing.

Kill times. A run spends most of its seconds starting (imports, model loading, DeepSpeed set-up) and
only the rest working; kills drawn over the whole run would mostly hit start-up. So with probability
``STARTUP_KILL_FRACTION`` (0.1) a kill is drawn uniformly over the reference's start-up (time from
launch to the stage's "work begins" log line, of every rank); otherwise it is drawn uniformly over the reference's
work time (work line to its final output, manifest.json or the export; the teardown after it is left out)
and delivered that long after *this* run's work line, stretched by this run's start-up over the
reference's (the machine's load changes during a campaign; in the reference's seconds, kills under a
heavier load all hit the first shard: a data_2ranks round had 15 kills and no shard published). If the
run's final output exists by the drawn time (a resumed run with little left to do), the kill is not
delivered: the run finishes and the round ends (delivered, such kills hit the teardown: 33 of
train_2ranks_zero2's 50 kills under the first rule). A delivered kill is thus uniform over the work the
run really had left. (Drawn over the work left -- reference work x share of steps/shards left -- rounds
barely progressed: a run's fixed work overhead, the second rank's later start, outlasted the window.)
Each kill is classified by what it actually hit: ``startup`` (no work line yet), ``work``, or
``finished_output`` (the final manifest/export appeared between the check and the kill); the rerun of a
run whose output exists is not killed (nothing is left to do).

Slurm requeue stages (``*_slurm_requeue``) submit the stage's template (slurm/train.sbatch, slurm/data.sbatch)
to a real cluster (scripts/start_local_slurm.sh) once per round; a kill stops the running job and the job
itself comes back (same job id, ``SLURM_RESTART_COUNT`` + 1, log appended) and resumes. Kill times are drawn
as above, from the moment the batch script starts (its ``[deepspec] job ... restart N`` line). Two ways,
drawn half and half: ``requeue`` -- ``scontrol requeue <job>``, what a preemption with PreemptMode=REQUEUE
does (Slurm sends SIGTERM to every process of the job, SIGKILL after KillWait, and queues the job again);
``sigkill+requeue`` -- every process of the job (the batch script, srun, torchrun, the ranks) SIGKILLed at
once, as when the node dies, then ``scontrol requeue <job>`` (what Slurm does for a ``--requeue`` job
after a node failure).

Lost work per kill: data -- the shards whose temporary file was discarded (rows whose target forward is
redone); training -- optimizer steps done before the kill minus the step of the last complete checkpoint
(the step the next run resumes from; checked against the resumed run's run_info.json).

Usage:
    python scripts/kill_campaign.py --stage data train --kills 50 --seed 0 --out runs/reliability
    python scripts/kill_campaign.py --stage all
    sudo bash scripts/start_local_slurm.sh && python scripts/kill_campaign.py --stage train_slurm_requeue

Writes ``<out>/<stage>.json`` per stage and prints a table.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's deepspec, whatever is installed

from deepspec.tiny_target import make_tiny_target, write_toy_prompts  # noqa: E402

STARTUP_KILL_FRACTION = 0.1  # share of kills aimed at start-up (imports, model load, plan, DeepSpeed init)
PROMPT_ROWS = 40
POLL_S = 0.005
RUN_TIMEOUT_S = 900
REGEN = ("regenerate.enabled=true", "regenerate.max_new_tokens=24", "regenerate.batch_size=4", "regenerate.temperature=1.0")
TARGET_ARGS = ("target.layer_ids=[-1,1,3]",)
# DeepSpeed JIT-builds a small op into the torch extensions folder, under a lock. A shared folder lets another
# process's rebuild (other tests, another environment) stall a run for a minute; the campaign keeps its own.
TORCH_EXTENSIONS_DIR = Path(tempfile.gettempdir()) / "deepspec-kill-campaign-torch-extensions"
SLURM_START_TIMEOUT_S = 600  # a requeued job waits ~10 s (cred_expire on the local cluster) before it starts again
SLURM_POLL_S = 0.2


def child_env() -> dict:
    """One BLAS thread per process (same float reductions everywhere), offline, fp32, DeepSpeed on the CPU."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "DEEPSPEC_AUTO_PRECISION": "fp32", "DS_ACCELERATOR": "cpu",
            "WANDB_MODE": "disabled", "TORCH_EXTENSIONS_DIR": str(TORCH_EXTENSIONS_DIR)}


def launcher(ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]


def data_command(target: Path, inputs: Path, out_dir: Path, *extra: str) -> list[str]:
    """The data build the tests run (shards of 6 rows, small batches), as a user types it."""
    return [str(REPO / "data" / "cache.py"), "build", *data_overrides(target, inputs, out_dir, *extra)]


def data_overrides(target: Path, inputs: Path, out_dir: Path, *extra: str) -> list[str]:
    return [f"target.name_or_path={target}", *TARGET_ARGS,
            f"input.paths=[{inputs}]", f"out_dir={out_dir}", "cache.samples_per_shard=6", "max_length=192",
            "min_loss_tokens=4", "batch_size=4", "progress=false", *extra]


MAX_STEPS = 12


def train_command(target: Path, cache: Path, run_dir: Path, *extra: str) -> list[str]:
    """Tiny deterministic DSpark training: 12 steps of 2 samples, a checkpoint every 2 steps, every step logged."""
    return [str(REPO / "train" / "train.py"), *train_overrides(target, cache, run_dir, *extra)]


def train_overrides(target: Path, cache: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"target.name_or_path={target}", *TARGET_ARGS, "target.mask_token_id=3",
            f"cache_dir={cache}", f"run_dir={run_dir}", "drafter=dspark_debug", "deepspeed.precision=fp32",
            "logging.progress=false", "logging.every_steps=1", "eval.val_fraction=0", "shuffle_buffer=1",
            "micro_batch_size=1", "global_batch_size=2", f"max_steps={MAX_STEPS}", "optim.lr=3e-3", "optim.warmup_ratio=0.1",
            "checkpoint.every_steps=2", "checkpoint.keep_last=2", *extra]


# ----------------------------------------------------------------------------- what a stage is
class Stage:
    """What every stage shares: a name, a rank count, extra overrides; a run is a local process (tree)."""
    work_line: re.Pattern
    lost_totals: tuple[str, ...]

    def __init__(self, name: str, ranks: int, extra: tuple[str, ...]):
        self.name, self.ranks, self.extra = name, ranks, extra

    @property
    def work_lines(self) -> int:
        """How many work lines mark the start of work (every rank of a data build logs its own)."""
        return 1

    def command(self, out_dir: Path) -> list[str]:
        raise NotImplementedError

    def launch(self, out_dir: Path, log_path: Path, first: bool) -> Launch:
        """Start one run of the stage (``first``: the first of a round, on an empty ``out_dir``)."""
        return ProcessLaunch(self.command(out_dir), log_path)

    def cleanup(self) -> None:
        """Nothing left running once the campaign ends (Slurm stages: their job cancelled)."""


class DataStage(Stage):
    """The data build (optionally 2 ranks under torchrun, optionally regenerating answers first)."""
    work_line = re.compile(r"shards \(\d+ rows\) to build")  # logged by each rank once it has loaded the target
    lost_totals = ("shards_discarded", "samples_redone")

    @property
    def work_lines(self) -> int:
        # Under load one rank may start seconds after the other: its start-up is no work (a data_2ranks reference
        # measured 8.6 s of "work", 5.5 s of it rank 0 still loading; most kills drawn over it came after the output).
        return self.ranks

    def prepare(self, work: Path) -> None:
        self.target = make_tiny_target(work / "target")
        self.inputs = write_toy_prompts(work / "chat.jsonl", PROMPT_ROWS)

    def overrides(self, out_dir: Path) -> list[str]:
        return data_overrides(self.target, self.inputs, out_dir, "cache.rows_per_row_group=3", *self.extra)

    def command(self, out_dir: Path) -> list[str]:
        return launcher(self.ranks) + [str(REPO / "data" / "cache.py"), "build", *self.overrides(out_dir)]

    def final_output(self, out_dir: Path) -> Path:
        return out_dir / "manifest.json"


    def snapshot(self, out_dir: Path) -> dict:
        """What exists: published shards, shards in progress (temporary files), regenerated answers on disk."""
        regen = sorted((out_dir / "regenerated").glob("*.jsonl"))
        return {"shards_done": len(list(out_dir.glob("shard-*.parquet"))),
                "shards_in_progress": sorted(p.name for p in out_dir.glob("shard-*.parquet.tmp")),
                "regenerated_answers": sum(p.read_bytes().count(b"\n") for p in regen),
                "manifest": (out_dir / "manifest.json").exists()}

    def lost_work(self, out_dir: Path, before_launch: dict, at_kill: dict) -> dict:
        """A shard in progress is discarded whole: its rows' target forward (and encoding) is redone."""
        plan = json.loads((out_dir / "plan.json").read_text()) if (out_dir / "plan.json").exists() else None
        rows = 0
        for name in at_kill["shards_in_progress"]:
            k, n = int(name.split("-")[1].split(".")[0]), plan["samples_per_shard"]
            rows += min(n, plan["num_rows"] - k * n)
        return {"shards_discarded": len(at_kill["shards_in_progress"]), "samples_redone": rows}

    def fingerprint(self, out_dir: Path) -> dict:
        manifest = json.loads((out_dir / "manifest.json").read_text())
        regen = {}
        for f in sorted((out_dir / "regenerated").glob("*.jsonl")):
            lines = f.read_text().splitlines()
            regen[f.name] = {"rows": len(lines), "answers": {json.loads(l)["id"]: json.loads(l)["messages"] for l in lines}}
        return {"manifest": manifest, "shards": {s["file"]: (out_dir / s["file"]).read_bytes() for s in manifest["shards"]},
                "regenerated": regen}

    def differences(self, ref: dict, got: dict) -> list[str]:
        out = []
        if got["manifest"] != ref["manifest"]:
            keys = sorted(k for k in set(ref["manifest"]) | set(got["manifest"]) if ref["manifest"].get(k) != got["manifest"].get(k))
            out.append(f"manifest differs in {keys}")
        for name in sorted(set(ref["shards"]) | set(got["shards"])):
            if ref["shards"].get(name) != got["shards"].get(name):
                out.append(f"{name}: bytes differ" if name in got["shards"] and name in ref["shards"] else f"{name}: missing on one side")
        for name in sorted(set(ref["regenerated"]) | set(got["regenerated"])):
            r, g = ref["regenerated"].get(name), got["regenerated"].get(name)
            if r is None or g is None or r["answers"] != g["answers"]:
                out.append(f"regenerated/{name}: answers differ")
            elif g["rows"] != len(g["answers"]):
                out.append(f"regenerated/{name}: {g['rows'] - len(g['answers'])} answers written twice")
        return out


class TrainStage(Stage):
    """DeepSpeed training of a tiny DSpark drafter on a cache built once from the same target."""
    work_line = re.compile(r"trainable parameters; \d+ optimizer steps")  # logged right before the first step
    lost_totals = ("steps_redone",)

    def prepare(self, work: Path) -> None:
        """Target and a 24-sample cache, one sample per row group (ranks split it the same way every time)."""
        self.target = make_tiny_target(work / "target")
        inputs = write_toy_prompts(work / "chat.jsonl", PROMPT_ROWS)
        self.cache = work / "train_cache"
        cmd = data_command(self.target, inputs, self.cache, "cache.rows_per_row_group=1", "input.max_rows=24")
        subprocess.run([sys.executable] + cmd + ["max_length=128"], env=child_env(), check=True, capture_output=True,
                       timeout=RUN_TIMEOUT_S)
        if not any(TORCH_EXTENSIONS_DIR.rglob("*.so")):  # build DeepSpeed's op once, before anything is timed or killed
            warm_up = train_command(self.target, self.cache, work / "warm_up", "max_steps=1", "deepspeed.zero_stage=0")
            subprocess.run([sys.executable] + warm_up, env=child_env(), check=True, capture_output=True, timeout=RUN_TIMEOUT_S)
            shutil.rmtree(work / "warm_up")

    def overrides(self, run_dir: Path) -> list[str]:
        return train_overrides(self.target, self.cache, run_dir, *self.extra)

    def command(self, run_dir: Path) -> list[str]:
        return launcher(self.ranks) + [str(REPO / "train" / "train.py"), *self.overrides(run_dir)]

    def final_output(self, run_dir: Path) -> Path:
        return run_dir / "export" / "model.safetensors"


    @staticmethod
    def _complete_steps(run_dir: Path) -> list[int]:
        return sorted(int(p.parent.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*/complete"))

    def snapshot(self, run_dir: Path) -> dict:
        """What exists: the last step logged in metrics.jsonl (every step is), complete and unfinished checkpoints."""
        metrics = run_dir / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        complete = self._complete_steps(run_dir)
        started = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
        return {"metrics_lines": len(lines), "last_logged_step": json.loads(lines[-1])["step"] if lines else 0,
                "last_complete_checkpoint": complete[-1] if complete else 0,
                "unfinished_checkpoints": [s for s in started if s not in complete],
                "export": self.final_output(run_dir).exists()}

    def lost_work(self, run_dir: Path, before_launch: dict, at_kill: dict) -> dict:
        """Steps done before the kill that the next run redoes: done - step of the checkpoint it resumes from."""
        logged_now = at_kill["metrics_lines"] > before_launch["metrics_lines"]  # else this run did no step yet
        done = at_kill["last_logged_step"] if logged_now else before_launch["last_complete_checkpoint"]
        return {"steps_done": done, "resumes_from_step": at_kill["last_complete_checkpoint"],
                "steps_redone": max(0, done - at_kill["last_complete_checkpoint"])}

    def fingerprint(self, run_dir: Path) -> dict:
        from safetensors.torch import load_file

        return load_file(self.final_output(run_dir))

    def differences(self, ref: dict, got: dict) -> list[str]:
        import torch

        out = [f"{k}: missing on one side" for k in sorted(set(ref) ^ set(got))]
        for k in sorted(set(ref) & set(got)):
            if ref[k].shape != got[k].shape or ref[k].dtype != got[k].dtype:
                out.append(f"{k}: {tuple(ref[k].shape)} {ref[k].dtype} vs {tuple(got[k].shape)} {got[k].dtype}")
            elif not torch.equal(ref[k], got[k]):
                out.append(f"{k}: max |diff| {(ref[k].double() - got[k].double()).abs().max().item():.3g}")
        return out


class SlurmRequeue:
    """Mixin: the stage runs as a job of its slurm/ template; a kill stops the job, which Slurm queues again
    (same job id) and which resumes. One ``sbatch`` per round."""
    template: str
    name: str
    ranks: int
    job: str | None = None

    def command(self, out_dir: Path) -> list[str]:
        return ["sbatch", "--parsable", f"--job-name=kill-{self.name}", "--output=<log>", self.template, *self.overrides(out_dir)]

    def launch(self, out_dir: Path, log_path: Path, first: bool) -> Launch:
        job_log = log_path.parent / f"{log_path.name.split('_attempt_')[0].removesuffix('.log')}.slurm.out"
        if first:
            self.cleanup()
            cmd = [a.replace("<log>", str(job_log)) for a in self.command(out_dir)]
            out = subprocess.run(cmd, cwd=REPO, env=slurm_env(self.ranks), capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                raise RuntimeError(f"sbatch failed: {out.stderr}")
            self.job = out.stdout.strip().split(";")[0]
        return SlurmLaunch(self.job, job_log, log_path)

    def cleanup(self) -> None:
        if self.job is not None:
            subprocess.run(["scancel", self.job], capture_output=True)
            self.job = None


class SlurmTrainStage(SlurmRequeue, TrainStage):
    template = "slurm/train.sbatch"


class SlurmDataStage(SlurmRequeue, DataStage):
    template = "slurm/data.sbatch"


STAGES = {
    "data": lambda: DataStage("data", 1, ()),
    "data_2ranks": lambda: DataStage("data_2ranks", 2, ()),
    "regen": lambda: DataStage("regen", 1, REGEN),
    "train": lambda: TrainStage("train", 1, ("deepspeed.zero_stage=1",)),
    "train_2ranks_zero2": lambda: TrainStage("train_2ranks_zero2", 2, ("deepspeed.zero_stage=2",)),
    "train_2ranks_zero3": lambda: TrainStage("train_2ranks_zero3", 2, ("deepspeed.zero_stage=3",)),
    # slurm/train.sbatch: torchrun (c10d rendezvous) with one rank (DEEPSPEC_GPUS_PER_NODE=1: a requeue costs half the
    # start-up of 2 ranks on 2 cores; 2 ranks are the local stages above); slurm/data.sbatch: one task
    "train_slurm_requeue": lambda: SlurmTrainStage("train_slurm_requeue", 1, ("deepspeed.zero_stage=2",)),
    "data_slurm_requeue": lambda: SlurmDataStage("data_slurm_requeue", 1, ()),
}


def slurm_env(ranks: int) -> dict:
    """What sbatch exports to the job: the campaign's environment, this venv's python first on PATH."""
    return {**child_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DEEPSPEC_ROOT": str(REPO),
            "DEEPSPEC_GPUS_PER_NODE": str(ranks)}


# ----------------------------------------------------------------------------- running and killing
def process_tree(root: int) -> list[int]:
    """``root`` and every process below it (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while we read
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo += children.get(pid, [])
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and all its descendants at once, whatever sessions they started."""
    pids = process_tree(proc.pid)
    for pid in pids:  # freeze first: nothing spawns, writes or reaps between listing and killing
        _signal(pid, signal.SIGSTOP)
    pids = process_tree(proc.pid)
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for group in groups - {os.getpgid(0)}:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in pids:
        _signal(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while any(_alive(p) for p in pids if p != proc.pid):  # orphans are reaped by init: wait until they are gone
        if time.time() > deadline:
            raise RuntimeError(f"processes {pids} survived SIGKILL")
        time.sleep(0.01)


def freeze_and_kill(list_pids: Callable[[], list[int]]) -> None:
    """SIGSTOP every process ``list_pids()`` names, list again (nothing spawns once frozen), SIGKILL them all, and
    wait until they are gone."""
    for pid in list_pids():
        _signal(pid, signal.SIGSTOP)
    pids = list_pids()
    for pid in pids:
        _signal(pid, signal.SIGKILL)
    deadline = time.time() + 30
    while any(_alive(p) for p in pids):
        if time.time() > deadline:
            raise RuntimeError(f"processes {pids} survived SIGKILL")
        time.sleep(0.01)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Launch(Protocol):
    """One run of a stage under way: a local process tree, or one start of a Slurm job."""
    t0: float  # time.monotonic() when it started
    atomic_kill: bool  # kill() stops everything at once (else the run may still write for a while: Slurm's KillWait)

    def text(self) -> str:
        """Its log so far."""

    def poll(self) -> int | None:
        """Its exit status once it ended, else None."""

    def kill(self, rng: random.Random) -> str:
        """Stop it the way this stage is killed; return once nothing of it runs any more. -> how it was killed."""


class ProcessLaunch:
    """``cmd`` as a local process in a session of its own, output to ``log_path``; killed with :func:`kill_tree`."""
    atomic_kill = True

    def __init__(self, cmd: list[str], log_path: Path):
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.t0 = time.monotonic()
            self.proc = subprocess.Popen(cmd, env=child_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill(self, rng: random.Random) -> str:
        kill_tree(self.proc)
        return "sigkill"


class SlurmLaunch:
    """One start of Slurm job ``job``: from its batch script's ``[deepspec] job ... restart N`` line in the job's
    (appended) log to the job leaving RUNNING. The part of the job log it wrote is copied to ``log_path``."""
    atomic_kill = False
    start_line = re.compile(r"\[deepspec\] job \d+.* restart \d+ on ")
    METHODS = ("requeue", "sigkill+requeue")

    def __init__(self, job: str, job_log: Path, log_path: Path):
        self.job, self.job_log, self.log_path = job, job_log, log_path
        self.offset = job_log.stat().st_size if job_log.exists() else 0  # earlier starts' lines end here
        self.ended: int | None = None
        self._last_poll = 0.0
        deadline = time.monotonic() + SLURM_START_TIMEOUT_S
        while True:  # wait for the batch script to start (a requeued job waits ~10 s in the queue)
            found = self.start_line.search(self._read())
            if found:
                self.offset += found.start()
                self.t0 = time.monotonic()
                return
            state = job_state(job)
            if state["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "COMPLETING"):
                self.t0, self.ended = time.monotonic(), self._exit_code(state)  # ended without starting again
                self._save()
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job} did not start within {SLURM_START_TIMEOUT_S} s: {state}")
            time.sleep(SLURM_POLL_S)

    def _read(self) -> str:
        if not self.job_log.exists():
            return ""
        with open(self.job_log, "rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")

    def _save(self) -> None:
        self.log_path.write_text(self._read())

    def text(self) -> str:
        return self._read()

    @staticmethod
    def _exit_code(state: dict) -> int:
        return 0 if state["JobState"] == "COMPLETED" else int(state.get("ExitCode", "1:0").split(":")[0]) or 1

    def poll(self) -> int | None:
        if self.ended is not None or time.monotonic() - self._last_poll < SLURM_POLL_S:
            return self.ended
        self._last_poll = time.monotonic()
        state = job_state(self.job)
        if state["JobState"] in ("RUNNING", "CONFIGURING", "COMPLETING"):
            return None
        # PENDING here means the job requeued itself (the trainer stopped with code 75) with no kill of ours: a failure
        self.ended = self._exit_code(state) if state["JobState"] != "PENDING" else 75
        self._save()
        return self.ended

    def kill(self, rng: random.Random) -> str:
        method = rng.choice(self.METHODS)
        if method == "sigkill+requeue":
            freeze_and_kill(lambda: slurm_job_processes(self.job))
        deadline = time.monotonic() + 60
        while subprocess.run(["scontrol", "requeue", self.job], capture_output=True).returncode != 0:  # refused while
            if time.monotonic() > deadline:  # the killed job is still completing
                raise RuntimeError(f"scontrol requeue {self.job} refused for 60 s: {job_state(self.job)}")
            time.sleep(SLURM_POLL_S)
        while job_state(self.job)["JobState"] != "PENDING":  # every process of the job has ended (KillWait: 10 s at most)
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {self.job} not back in the queue 60 s after the requeue: {job_state(self.job)}")
            time.sleep(SLURM_POLL_S)
        self._save()
        return method


def slurm_cluster_up() -> bool:
    return shutil.which("sinfo") is not None and subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0


def job_state(job: str) -> dict[str, str]:
    """``scontrol show job``'s KEY=VALUE fields (JobState, Restarts, ExitCode, ...)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    return dict(token.split("=", 1) for token in out.split() if "=" in token) or {"JobState": "UNKNOWN"}


def slurm_job_processes(job: str) -> list[int]:
    """Every process of ``job`` on this node: what its slurmstepd processes (batch script, steps) started."""
    steps = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes().startswith(f"slurmstepd: [{job}.".encode()):
                steps.append(int(cmdline.parent.name))
        except OSError:
            continue
    return [pid for step in steps for pid in process_tree(step)[1:]]


@dataclass
class Attempt:
    """One launch of the stage's command: how it ended, when its work began and when its final output
    (manifest / export) appeared (seconds from launch; the rest is tearing down)."""
    outcome: str  # "killed", "finished" or "failed"
    returncode: int | None
    duration_s: float
    work_began_s: float | None
    output_s: float | None
    killed_at_s: float | None = None
    pace: float | None = None  # this run's start-up / the reference's: how much slower the machine is now
    kill_method: str | None = None
    output_at_kill: bool = False  # the final output existed when the kill was delivered
    kill_skipped: bool = False  # a kill was drawn, but the final output came first: the run was let finish


def run_once(launch: Launch, work_line: re.Pattern, work_lines: int, final_output: Path, kill_plan: tuple[str, float] | None,
             rng: random.Random, reference_startup_s: float | None = None) -> Attempt:
    """Watch ``launch`` (its work begins once ``work_lines`` lines match ``work_line``); with ``kill_plan`` = ("launch"|"work", seconds), kill it that long after it started, or that
    long after its work line appears, in the reference's seconds: times this run's start-up / ``reference_startup_s``
    (the machine's load changes during a campaign; work slows down as start-up does). Never, if its final output
    exists by then (it finishes: ``kill_skipped``)."""
    t0 = launch.t0
    work_began = output = pace = None
    kill_skipped = False
    while True:
        now = time.monotonic() - t0
        if work_began is None and len(work_line.findall(launch.text())) >= work_lines:
            work_began = now
        if output is None and final_output.exists():
            output = now
        if kill_plan is not None:
            anchor, delay = kill_plan
            if work_began is not None and pace is None:
                pace = work_began / reference_startup_s if reference_startup_s else 1.0
            due = delay if anchor == "launch" else (None if work_began is None else work_began + delay * pace)
            if due is not None and now >= due and launch.poll() is None:
                if final_output.exists():  # its work was done before the drawn time: no kill, it finishes (ends the round)
                    kill_plan, kill_skipped = None, True
                    continue
                output_at_kill = False
                method = launch.kill(rng)
                # A local tree is frozen before it dies: what exists after the kill existed at it.
                output_at_kill = output_at_kill or (launch.atomic_kill and final_output.exists())
                return Attempt("killed", None, time.monotonic() - t0, work_began, output, now, pace, method, output_at_kill)
        rc = launch.poll()
        if rc is not None:
            if work_began is None and len(work_line.findall(launch.text())) >= work_lines:
                work_began = now
            return Attempt("finished" if rc == 0 else "failed", rc, time.monotonic() - t0, work_began, output or now,
                           kill_skipped=kill_skipped)
        if now > RUN_TIMEOUT_S:
            launch.kill(rng)
            return Attempt("failed", None, time.monotonic() - t0, work_began, output)
        time.sleep(POLL_S)


def draw_kill(rng: random.Random, startup_s: float, work_s: float) -> tuple[str, float]:
    """A kill time: over the reference's start-up (STARTUP_KILL_FRACTION of kills) or over its work time, counted
    from this run's work line (see the module docstring)."""
    if rng.random() < STARTUP_KILL_FRACTION:
        return "launch", rng.uniform(0, startup_s)
    return "work", rng.uniform(0, work_s)


def log_tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:]


# ----------------------------------------------------------------------------- the campaign
def run_campaign(stage_name: str, kills: int, seed: int, work: Path, say=print, budget_s: float | None = None) -> dict:
    """Reference run, then rounds of kill/resume until ``kills`` kills and a final finished run (or, past ``budget_s``
    seconds, no further kill: the round under way finishes and the report says ``complete: false``). -> the report."""
    t_start, commit = time.time(), git_commit()
    stage = STAGES[stage_name]()
    work.mkdir(parents=True, exist_ok=True)
    stage.prepare(work)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)

    ref_dir = work / "reference"
    ref = run_once(stage.launch(ref_dir, logs / "reference.log", first=True), stage.work_line, stage.work_lines,
                   stage.final_output(ref_dir), None, random.Random(seed))
    if ref.outcome != "finished" or ref.work_began_s is None:
        raise RuntimeError(f"{stage_name}: the reference run {ref.outcome} (rc {ref.returncode}):\n{log_tail(logs / 'reference.log')}")
    startup_s, work_s = ref.work_began_s, ref.output_s - ref.work_began_s  # teardown after the output is no work
    ref_fp = stage.fingerprint(ref_dir)
    say(f"[{stage_name}] reference: {ref.duration_s:.1f} s (start-up {startup_s:.1f} s, work {work_s:.2f} s, "
        f"teardown {ref.duration_s - ref.output_s:.2f} s)")

    rng = random.Random(seed)
    kill_records, rounds, crashes, differences = [], [], [], []
    deadline = t_start + budget_s if budget_s else float("inf")
    while len(kill_records) < kills and len(crashes) < 3 and time.time() < deadline:
        r = len(rounds)
        try:
            attempt, round_kills = run_round(stage, work / f"round_{r:03d}", logs, r, rng, kills - len(kill_records),
                                             (startup_s, work_s), crashes, say, deadline)
        finally:
            stage.cleanup()
        kill_records += round_kills
        found = stage.differences(ref_fp, stage.fingerprint(work / f"round_{r:03d}")) if attempt.outcome == "finished" else []
        differences += [{"round": r, "kills_in_round": len(round_kills), "difference": d} for d in found]
        if attempt.outcome == "finished":
            say(f"[{stage_name}] round {r}: {len(round_kills)} kills, finished, "
                f"{'EQUAL to the reference' if not found else f'{len(found)} DIFFERENCES: {found[:3]}'} "
                f"(total kills {len(kill_records)}/{kills})")
        rounds.append({"round": r, "attempts": len(round_kills) + 1, "outcome": attempt.outcome, "kills": len(round_kills),
                       "last_run_finished_before_its_drawn_kill": attempt.kill_skipped})
        if attempt.outcome == "finished" and not found:
            shutil.rmtree(work / f"round_{r:03d}", ignore_errors=True)  # keep only rounds that show a problem

    phases, methods = [k["phase"] for k in kill_records], [k["method"] for k in kill_records]
    return {
        "stage": stage_name,
        "command": " ".join(stage.command(Path("<out_dir>"))).replace(str(work), "<work>"),
        "kills": len(kill_records),
        "complete": len(kill_records) >= kills,  # false: stopped by --budget-minutes (or 3 crashes)
        "kills_by_phase": {p: phases.count(p) for p in ("startup", "work", "finished_output")},
        "kills_by_method": {m: methods.count(m) for m in sorted(set(methods))},
        "kills_drawn_after_the_output": sum(r["last_run_finished_before_its_drawn_kill"] for r in rounds),  # not delivered
        "resumes": sum(r["attempts"] - 1 for r in rounds),  # every kill is followed by a rerun of the same command
        "rounds": len(rounds),
        "rounds_compared": sum(r["outcome"] == "finished" for r in rounds),
        "lost_work_total": {k: sum(rec["lost"][k] for rec in kill_records) for k in stage.lost_totals},
        "differences": len(differences),
        "difference_details": differences,
        "crashes": crashes,
        "reference": {"duration_s": round(ref.duration_s, 2), "startup_s": round(startup_s, 2), "work_s": round(work_s, 2),
                      "teardown_s": round(ref.duration_s - ref.output_s, 2)},
        "kill_time_policy": (f"with probability {STARTUP_KILL_FRACTION}: uniform over the reference start-up [0, {startup_s:.2f}] s "
                             f"after launch; otherwise uniform over the reference work time [0, {work_s:.2f}] s after this run's "
                             f"work line ({stage.work_line.pattern!r} x {stage.work_lines}), stretched by this run's start-up / "
                             f"the reference's (the machine's load changes); not delivered if the run's final output exists by "
                             f"then (the run finishes, the round ends), nor drawn for a rerun whose output already exists; seed {seed}"
                             + ("; kill: 'requeue' = scontrol requeue (SIGTERM, SIGKILL after KillWait, queued again) or "
                                "'sigkill+requeue' = SIGKILL to every process of the job at once, then scontrol requeue, "
                                "drawn half and half" if isinstance(stage, SlurmRequeue) else "; kill: SIGKILL to the whole process tree")),
        "wall_time_s": round(time.time() - t_start, 1),
        "machine": machine(),
        "git_commit": commit,
        "per_round": rounds,
        "per_kill": kill_records,
    }


def run_round(stage, out_dir: Path, logs: Path, r: int, rng: random.Random, kills_left: int, reference_s: tuple[float, float],
              crashes: list, say, deadline: float = float("inf")) -> tuple[Attempt, list[dict]]:
    """From an empty ``out_dir``: run, kill at a drawn time, rerun, ... (at most ``kills_left`` kills) until a run
    finishes or fails (appended to ``crashes``). -> (the last attempt, one record per kill)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    records: list[dict] = []
    while True:
        # Once the final output exists (a kill during teardown) the rerun has no work left to interrupt: just finish.
        work_left = not stage.final_output(out_dir).exists()
        plan = draw_kill(rng, *reference_s) if work_left and len(records) < kills_left and time.time() < deadline else None
        log_path = logs / f"round_{r:03d}_attempt_{len(records):02d}.log"
        before = stage.snapshot(out_dir)
        launch = stage.launch(out_dir, log_path, first=not records)
        attempt = run_once(launch, stage.work_line, stage.work_lines, stage.final_output(out_dir), plan, rng, reference_s[0])
        if records:
            _check_resumed_from(stage, out_dir, records[-1], attempt)
        if attempt.outcome == "failed":
            crashes.append({"round": r, "attempt": len(records), "returncode": attempt.returncode, "log_tail": log_tail(log_path)})
            say(f"[{stage.name}] round {r} attempt {len(records)}: CRASH rc={attempt.returncode}\n{log_tail(log_path, 1500)}")
        if attempt.outcome != "killed":
            return attempt, records
        at_kill = stage.snapshot(out_dir)
        phase = ("finished_output" if attempt.output_at_kill else
                 "work" if attempt.work_began_s is not None else "startup")
        records.append({"round": r, "attempt": len(records), "kill_s": round(attempt.killed_at_s, 3), "method": attempt.kill_method,
                        "aimed_at": plan[0], "delay_s": round(plan[1], 3),
                        "pace": None if attempt.pace is None else round(attempt.pace, 3),
                        "kill_after_work_began_s": None if attempt.work_began_s is None else round(attempt.killed_at_s - attempt.work_began_s, 3),
                        "phase": phase, "before_launch": before, "at_kill": at_kill, "lost": stage.lost_work(out_dir, before, at_kill)})


def _check_resumed_from(stage, out_dir: Path, pending: dict, attempt: Attempt) -> None:
    """Training: the step the next run says it resumed from (run_info.json) must be the last complete checkpoint."""
    info = out_dir / "run_info.json"
    if isinstance(stage, TrainStage) and attempt.work_began_s is not None and info.exists():
        resumed = json.loads(info.read_text()).get("resumed_from")
        step = int(Path(resumed).name.split("_")[1]) if resumed else 0
        pending["lost"]["next_run_resumed_from_step"] = step
        if step != pending["lost"]["resumes_from_step"]:
            pending["lost"]["note"] = "resumed from another checkpoint than the last complete one"


def machine() -> dict:
    import torch

    return {"cpu_count": os.cpu_count(), "threads_per_process": 1, "load_average": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}


@functools.lru_cache(maxsize=1)  # the commit when this process started: the code it runs
def git_commit() -> str:
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return rev + ("+uncommitted changes" if dirty else "")


def print_table(reports: list[dict]) -> None:
    print(f"\n{'stage':<20} {'kills':>5} {'in work':>7} {'resumes':>7} {'rounds':>6} {'lost work':<34} {'diffs':>5} {'crashes':>7} {'wall s':>7} complete")
    for r in reports:
        lost = ", ".join(f"{k} {v}" for k, v in r["lost_work_total"].items())
        print(f"{r['stage']:<20} {r['kills']:>5} {r['kills_by_phase']['work']:>7} {r['resumes']:>7} {r['rounds_compared']:>6} "
              f"{lost:<34} {r['differences']:>5} {len(r['crashes']):>7} {r['wall_time_s']:>7.0f} {'yes' if r['complete'] else 'NO'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", nargs="+", default=["data"], choices=[*STAGES, "all"],
                    help="stages to campaign on, or all (the *_slurm_requeue ones only where a Slurm cluster answers)")
    ap.add_argument("--kills", type=int, default=50, help="kills per stage (a final run then finishes each round)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "reliability", help="one <stage>.json per stage here")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="per stage: no new kill after this long (the round under way finishes; the JSON says complete: false)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed after)")
    args = ap.parse_args()
    stages = list(STAGES) if "all" in args.stage else args.stage
    if not slurm_cluster_up():
        if "all" not in args.stage and any(name.endswith("_slurm_requeue") for name in stages):
            sys.exit("no Slurm cluster answers (sinfo): start one with `sudo bash scripts/start_local_slurm.sh`")
        stages = [name for name in stages if not name.endswith("_slurm_requeue")]
    git_commit()  # read now: commits made while the campaigns run do not describe the code running
    args.out.mkdir(parents=True, exist_ok=True)
    reports = []
    for name in stages:
        work = Path(tempfile.mkdtemp(prefix=f"kill_{name}_")) if args.work is None else args.work / name
        report = run_campaign(name, args.kills, args.seed, work, budget_s=args.budget_minutes and 60 * args.budget_minutes)
        (args.out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"[{name}] wrote {args.out / f'{name}.json'}")
        if args.work is None and not report["differences"] and not report["crashes"]:
            shutil.rmtree(work, ignore_errors=True)
        reports.append(report)
    print_table(reports)
    sys.exit(1 if any(r["differences"] or r["crashes"] for r in reports) else 0)


if __name__ == "__main__":
    main()
