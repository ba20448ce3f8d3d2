"""`train/train.py target=<real model> drafter=<d>` resolves to DeepSpec's training recipe, value for value.

The recipe was read from the reference's own config files (deepseek-ai/DeepSpec config/<drafter>/*.py and its
optimizer) into tests/fixtures/reference_recipe.json, with the commit; nothing here re-derives it. Every real target
preset, every drafter, the train and the data stage: resolved through Hydra and the typed configs exactly as the entry
points resolve them. The toy keeps small settings (configs/recipe/), stated as such and checked to stay small.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from deepspec.config import CONFIG_DIR, DataStageConfig, TrainStageConfig, register_configs, to_dataclass

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "reference_recipe.json").read_text())
REAL_TARGETS = sorted(p.stem for p in (CONFIG_DIR / "target").glob("*.yaml") if p.stem not in ("toy", "target_schema"))


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_configs()


def resolved(config: str, overrides: list[str], schema):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return to_dataclass(compose(config, overrides=overrides), schema)


def expected_train_values(drafter: str) -> dict:
    """Our keys -> the reference's values for ``drafter`` (the mapping is the only thing written here)."""
    ref = REFERENCE["drafters"][drafter]
    m, t = ref["model"], ref["train"]
    out = {"optim.lr": t["lr"], "optim.warmup_ratio": t["warmup_ratio"], "optim.weight_decay": t["weight_decay"],
           "optim.grad_clip": t["max_grad_norm"], "optim.betas": REFERENCE["optimizer"]["betas"],
           "micro_batch_size": t["local_batch_size"], "global_batch_size": t["global_batch_size"],
           "epochs": t["num_train_epochs"], "max_length": ref["data"]["max_length"]}
    if drafter == "eagle3":
        assert m["draft_num_hidden_layers"] == 1  # our Eagle3 has its one midlayer by construction
        return out | {"drafter.ttt_steps": m["ttt_length"], "drafter.step_loss_decay": m["step_loss_decay"]}
    out |= {"drafter.block_size": m["block_size"], "drafter.num_hidden_layers": m["num_draft_layers"],
            "drafter.num_anchors": m["num_anchors"], "loss.decay_gamma": m["loss_decay_gamma"], "loss.ce_weight": m["ce_loss_alpha"],
            "loss.l1_weight": m["l1_loss_alpha"], "loss.confidence_weight": m["confidence_head_alpha"]}
    if drafter == "dspark":
        out |= {"drafter.markov_rank": m["markov_rank"], "drafter.markov_head_type": m["markov_head_type"],
                "drafter.confidence_head_with_markov": m["confidence_head_with_markov"]}
    else:
        assert m["markov_rank"] == 0  # the reference's DFlash is its DSpark without the Markov head: ours has none
    return out


def value(cfg, key: str):
    head, _, rest = key.partition(".")
    node = getattr(cfg, head)
    if not rest:
        return node
    return node[rest] if isinstance(node, dict) else getattr(node, rest)


@pytest.mark.parametrize("drafter", ["dspark", "dflash", "eagle3"])
@pytest.mark.parametrize("target", REAL_TARGETS)
def test_every_real_target_trains_with_the_reference_recipe(target, drafter):
    cfg = resolved("train", [f"target={target}", f"drafter={drafter}", "cache_dir=x"], TrainStageConfig)
    got = {k: value(cfg, k) for k in expected_train_values(drafter)}
    want = expected_train_values(drafter)
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in got.items()} == want
    data = resolved("data", [f"target={target}", "input.paths=[x.jsonl]"], DataStageConfig)
    assert data.max_length == REFERENCE["drafters"][drafter]["data"]["max_length"]


@pytest.mark.parametrize("target", sorted(REFERENCE["targets"]))
def test_presets_the_reference_has_read_its_layers_and_mask(target):
    ref = REFERENCE["targets"][target]
    cfg = resolved("train", [f"target={target}", "cache_dir=x"], TrainStageConfig)
    assert (cfg.target.name_or_path, cfg.target.layer_ids, cfg.target.mask_token_id) == (
        ref["target_model_name_or_path"], ref["target_layer_ids"], ref["mask_token_id"])


@pytest.mark.parametrize("drafter", ["dspark", "dflash", "eagle3"])
def test_the_toy_keeps_small_settings(drafter):
    """The toy is not the recipe: a CPU trains it in minutes (configs/recipe/). An explicit override still wins."""
    cfg = resolved("train", ["target=toy", f"drafter={drafter}", "cache_dir=x"], TrainStageConfig)
    assert (cfg.global_batch_size, cfg.epochs, cfg.max_length, list(cfg.optim.betas)) == (8, 1.0, 1024, [0.9, 0.95])
    assert cfg.drafter.get("num_hidden_layers", 2) == 2
    assert resolved("data", ["target=toy", "input.paths=[x.jsonl]"], DataStageConfig).max_length == 1024
    again = resolved("train", ["target=toy", f"drafter={drafter}", "cache_dir=x", "global_batch_size=16"], TrainStageConfig)
    assert again.global_batch_size == 16
