"""The eval stage end to end through its command line: a real exported drafter, scheduled verification
with the profiled cost model, the report files; greedy output checked identical to plain greedy."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepspec.export import export_drafter
from deepspec.training.trainer import build_drafter
from test_online_and_export import DRAFTER, train_cfg

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("policy", ["fixed", "scheduled_with_draft_cost"])
def test_eval_cli_writes_a_lossless_report(tiny_target, tmp_path, policy):
    cfg = train_cfg(tiny_target, [], DRAFTER["dspark"], cache_dir="unused")
    drafter, _ = build_drafter(cfg, torch.device("cpu"))
    export = export_drafter(drafter, tmp_path / "export", include_frozen=False, target=cfg.target)
    run = tmp_path / "eval"
    env = {**os.environ, "DEEPSPEC_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(REPO / "eval" / "eval.py"), f"target.name_or_path={tiny_target}", "target.layer_ids=[-1,1,3]",
                    "target.mask_token_id=3", f"drafter_path={export}", f"run_dir={run}", "max_new_tokens=12", "peers=false",
                    f"schedule.policy={policy}", "serving_loads=[1,2]", "sps_max_tokens=6",
                    "datasets=[{name:heldout,path:deepspec/assets/toy_prompts/heldout.jsonl,max_prompts:3}]"],
                   check=True, cwd=REPO, env=env, capture_output=True)
    results = json.loads((run / "results.json").read_text())
    entry = results["datasets"]["heldout"]
    assert entry["greedy"]["greedy_identical_to_plain"] is True
    assert entry["sampled"]["tau"] >= 1.0
    opening = (run / "summary.md").read_text().split("\n\n")[1]  # plain words for a newcomer, before any table
    s = entry["sampled"]
    assert opening.startswith("A DSpark drafter (1 layer, ") and f"{s['speedup']:.2f}x" in opening
    assert f"kept {s['tau']:.2f} tokens on average" in opening and "plain decoding steps of drafting" in opening
    assert results["drafter"]["kind"] == "DSpark" and results["drafter"]["trainable_parameters"] > 0
    if policy == "fixed":  # every round drafted: calibration and the serving replay are reported
        assert "calibration" in entry["sampled"] and "serving_simulation" in entry
        pooled = results["calibration_pooled"]  # one set: the pooled fit is that set's fit; it is what the drafter loads
        assert pooled["sets"] == ["heldout"] and pooled["sts_temperatures"] == entry["sampled"]["calibration"]["sts_temperatures"]
        assert pooled["after"]["ece"] == entry["sampled"]["calibration"]["after"]["ece"]
        saved = json.loads((export / "confidence_temperatures.json").read_text())
        assert saved["temperatures"] == pooled["sts_temperatures"] and saved["fitted_on"] == ["heldout"]
    else:  # the verify cost was profiled once and cached for the next run (unless other processes had the cores)
        assert list((tmp_path / "cache" / "verify_cost").glob("*.json")) or b"while the CPU was busy" in proc.stdout + proc.stderr


@pytest.mark.slow  # a subprocess eval with its verify-cost profile: ~40 s on 2 cores
def test_eval_cli_on_a_hybrid_target(tmp_path):
    """The eval stage on a Qwen3.5-shaped target (gated delta-net layers rolled back per row): the profiled cost model
    pays the rollback, the scheduled loop and the report run, and greedy output is plain greedy's."""
    from test_target_families import save_tiny

    target = save_tiny(tmp_path / "qwen3_5", "qwen3_5")
    cfg = train_cfg(target, [], DRAFTER["dspark"], cache_dir="unused")
    drafter, _ = build_drafter(cfg, torch.device("cpu"))
    export = export_drafter(drafter, tmp_path / "export", include_frozen=False, target=cfg.target)
    run = tmp_path / "eval"
    env = {**os.environ, "DEEPSPEC_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(REPO / "eval" / "eval.py"), f"target.name_or_path={target}", "target.layer_ids=[-1,1,3]",
                    "target.mask_token_id=3", f"drafter_path={export}", f"run_dir={run}", "max_new_tokens=12", "peers=false",
                    "schedule.policy=scheduled_with_draft_cost", "serving_loads=[1,2]", "sps_max_tokens=6",
                    "datasets=[{name:heldout,path:deepspec/assets/toy_prompts/heldout.jsonl,max_prompts:2}]"],
                   check=True, cwd=REPO, env=env, capture_output=True)
    entry = json.loads((run / "results.json").read_text())["datasets"]["heldout"]
    assert entry["greedy"]["greedy_identical_to_plain"] is True and entry["sampled"]["tau"] >= 1.0
