"""A short random-kill campaign: the data build and training are SIGKILLed (whole process tree) at seeded random
times, at least 3 times each, resumed with the same command, and must end equal to an uninterrupted run (cache:
manifest and shard bytes; training: every exported tensor, fp32). ``scripts/kill_campaign.py`` runs the long
campaigns (>= 50 kills per stage, 2 ranks, ZeRO-2/3, regeneration, Slurm requeues; results in ``runs/reliability/``).
The Slurm test needs a cluster (scripts/start_local_slurm.sh, as CI starts it) and is skipped without one."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import REPO, slurm_cluster_up

pytestmark = pytest.mark.slow


def load_kill_campaign():
    """The script as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("kill_campaign", REPO / "scripts" / "kill_campaign.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stage", ["data", "train"])
def test_random_kills_and_resumes_end_equal_to_an_uninterrupted_run(stage, tmp_path):
    report = load_kill_campaign().run_campaign(stage, kills=3, seed=0, work=tmp_path)
    assert report["crashes"] == [], report["crashes"][0]["log_tail"]
    assert report["differences"] == 0, report["difference_details"]
    assert report["kills"] >= 3 and report["rounds_compared"] >= 1
    assert report["kills_by_phase"]["work"] >= 1, "no kill hit real work: the campaign proves nothing"


@pytest.mark.slurm
@pytest.mark.skipif(not slurm_cluster_up(), reason="needs a Slurm cluster (sbatch on PATH; scripts/start_local_slurm.sh)")
def test_slurm_requeues_resume_to_the_uninterrupted_result(tmp_path):
    """slurm/data.sbatch requeued mid-build (scontrol requeue, or SIGKILL of the job's processes + requeue): the same
    job comes back, skips the published shards and ends with the reference's cache. (The training template's campaign,
    ``train_slurm_requeue``, takes a minute per requeue here: the long script only.)"""
    report = load_kill_campaign().run_campaign("data_slurm_requeue", kills=2, seed=0, work=tmp_path)
    assert report["crashes"] == [], report["crashes"][0]["log_tail"]
    assert report["differences"] == 0, report["difference_details"]
    assert report["kills"] >= 2 and report["rounds_compared"] >= 1
    assert report["kills_by_phase"]["startup"] + report["kills_by_phase"]["work"] >= 1, "every requeue came after the output"
