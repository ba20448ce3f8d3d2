"""The verify-cost profile is measured point by point, only where a run needs it, and kept: an eval of one prompt
measures one row's widths and nothing else; the next eval of the same target on the same machine measures nothing;
a point measured on a busy CPU is used, kept flagged, and measured once more by the first run on a quiet CPU."""
from __future__ import annotations

import json
import os

import pytest
import torch

from deepspec.config.data import TargetConfig
from deepspec.decoding.scheduler import VerifyCostModel
from deepspec.decoding.verify_cost import VerifyCostProfile, combine, powers_of_two_around
from deepspec.target import TargetModel

IDLE = (0.0, 0.0, 0.0)


def busy() -> tuple[float, float, float]:
    return (3.0 * (os.cpu_count() or 1), 0.0, 0.0)


@pytest.fixture
def target(tiny_target):
    return TargetModel.from_config(TargetConfig(name_or_path=str(tiny_target), layer_ids=[0]))


def profile_file(tmp_path) -> dict:
    return json.loads(next((tmp_path / "verify_cost").glob("*.points.json")).read_text())


def test_grid_helpers():
    assert [powers_of_two_around(n) for n in (1, 2, 3, 5, 8, 33)] == [(1, 1), (2, 2), (2, 4), (4, 8), (8, 8), (32, 64)]
    assert combine((2.0, True), (1.0, False)) == (1.0, True)  # the faster value; final once measured quiet
    assert combine((2.0, False), (1.0, False)) == (1.0, False) and combine((2.0, True), (1.5, True)) == (1.5, True)


@pytest.mark.parametrize("policy", ["fixed", "scheduled_with_draft_cost"])
def test_an_eval_of_one_prompt_measures_one_row_and_a_second_eval_measures_nothing(tiny_target, tmp_path, monkeypatch, policy):
    """The acceptance check of a first run on a fresh machine: the eval's first prompt waits for at most one row's widths."""
    from deepspec.config.eval import EvalDatasetConfig, EvalStageConfig
    from deepspec.config.decoding import ScheduleConfig
    from deepspec.evaluation.harness import EvalHarness
    from deepspec.export import export_drafter
    from deepspec.training.trainer import build_drafter
    from test_online_and_export import DRAFTER, train_cfg

    monkeypatch.setattr("os.getloadavg", lambda: IDLE)
    monkeypatch.setenv("DEEPSPEC_CACHE", str(tmp_path / "cache"))
    drafter, _ = build_drafter(train_cfg(tiny_target, [], DRAFTER["dspark"], cache_dir="unused"), torch.device("cpu"))
    export = export_drafter(drafter, tmp_path / "export", include_frozen=False, target=train_cfg(tiny_target, [], DRAFTER["dspark"], cache_dir="unused").target)
    cfg = EvalStageConfig(run_dir=str(tmp_path / "eval"), drafter_path=str(export), max_new_tokens=8, peers=False, also_greedy=False,
                          target=TargetConfig(name_or_path=str(tiny_target), layer_ids=[-1, 1, 3], mask_token_id=3),
                          datasets=[EvalDatasetConfig(name="one", path="deepspec/assets/toy_prompts/heldout.jsonl", max_prompts=1)],
                          serving_loads=[1, 4], sps_max_tokens=16, schedule=ScheduleConfig(policy=policy))
    first = EvalHarness(cfg).run()["verify_cost"]
    block = DRAFTER["dspark"]["block_size"]
    rows = {R for R, _ in first["measured"]}
    widths = {W for _, W in first["measured"]}
    assert rows == {1} and len(first["measured"]) == len(widths)  # one row, each width once
    assert widths <= set(range(1, max(block + 1, cfg.sps_max_tokens) + 1))
    if policy == "fixed":  # only the serving replay reads the cost: its coarse grid of packed widths
        assert widths == {1, 2, 4, 8, 16}
    else:  # the engine's exact widths 1..block + 1, measured before the first prompt (and the replay's, if it ran)
        assert set(range(1, block + 2)) <= widths <= set(range(1, block + 2)) | {8, 16}
    again = EvalHarness(cfg).run()["verify_cost"]
    assert again["points_measured"] == 0 and again["points_read"] == len(first["measured"])


def test_points_are_measured_on_demand_interpolated_and_kept_as_measured(target, tmp_path, monkeypatch):
    monkeypatch.setattr("os.getloadavg", lambda: IDLE)
    cost = VerifyCostProfile.open(target, str(tmp_path))
    assert cost.measured_now == [] and not list(tmp_path.glob("verify_cost/*"))  # opening measures nothing
    assert cost(3, 2) > 0 and sorted(cost.measured_now) == [(2, 2), (4, 2)]  # rows between powers of two: both sides
    assert cost(3, 2) == pytest.approx((cost.repaired(2, 2) + cost.repaired(4, 2)) / 2)
    assert len(profile_file(tmp_path)["points"]) == 2  # each point written as soon as measured
    cost.coarse(1, 6)
    assert (1, 4) in cost.measured_now and (1, 8) in cost.measured_now and (1, 6) not in cost.measured_now
    # monotone: a smaller forward never costs more than a larger one measured (a stall inflated the small one)
    assert cost(2, 1) <= cost(4, 2) and cost(1, 4) <= cost(1, 8)
    stalled = VerifyCostProfile(target, None)
    stalled.points = {(1, 1): (5.0, True), (2, 2): (0.5, True)}
    assert stalled(1, 1) == 0.5 and stalled.point(1, 1) == 5.0 and stalled.measured_now == []
    # the dense grid of a serving benchmark reads the points it shares, measures the rest
    grid = VerifyCostModel.load_or_profile(target, max_rows=2, max_width=2, cache_dir=str(tmp_path))
    assert grid.rows == [1, 2] and grid.widths == [1, 2]
    assert grid.seconds[1][1] == cost.points[2, 2][0]  # (2, 2) read back, not measured again
    reread = VerifyCostProfile.open(target, str(tmp_path))
    assert reread.read_points == len(profile_file(tmp_path)["points"]) >= 6 and reread(3, 2) > 0 and reread.measured_now == []


def test_a_busy_point_is_used_kept_and_measured_again_once_on_a_quiet_cpu(target, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("os.getloadavg", busy)
    with caplog.at_level("WARNING"):
        first = VerifyCostProfile.open(target, str(tmp_path))
        slow = first(1, 2)
    assert "while the CPU was busy" in caplog.text and profile_file(tmp_path)["points"][0][3] is False  # kept, flagged
    again_busy = VerifyCostProfile.open(target, str(tmp_path))
    assert again_busy(1, 2) == slow and again_busy.measured_now == []  # still busy: used as it is, nothing measured
    monkeypatch.setattr("os.getloadavg", lambda: IDLE)
    quiet = VerifyCostProfile.open(target, str(tmp_path))
    assert quiet(1, 2) <= slow and quiet.measured_now == [(1, 2)]  # measured once more, the faster value kept
    assert quiet.point(1, 2) == quiet(1, 2) and quiet.measured_now == [(1, 2)]  # once per run
    (_, _, seconds, was_quiet), = profile_file(tmp_path)["points"]
    assert was_quiet is True and seconds <= slow
    final = VerifyCostProfile.open(target, str(tmp_path))
    assert final(1, 2) == seconds and final.measured_now == []  # a quiet point is final


def test_a_corrupt_profile_is_measured_again(target, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("os.getloadavg", lambda: IDLE)
    VerifyCostProfile.open(target, str(tmp_path))(1, 1)
    next((tmp_path / "verify_cost").glob("*.json")).write_text("{not json")
    with caplog.at_level("WARNING"):
        cost = VerifyCostProfile.open(target, str(tmp_path))
        cost(1, 1)
    assert "unreadable verify-cost profile" in caplog.text and cost.measured_now == [(1, 1)]
    assert profile_file(tmp_path)["points"][0][:2] == [1, 1]
