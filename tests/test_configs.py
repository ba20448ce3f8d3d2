"""Every YAML preset composes through Hydra into a valid DataStageConfig; bad values name their key."""
from __future__ import annotations

import itertools
import re

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from deepspec.config import CONFIG_DIR, ConfigError, DataStageConfig, register_configs, to_dataclass

TARGET_PRESETS = sorted(p.stem for p in (CONFIG_DIR / "target").glob("*.yaml"))
CACHE_PRESETS = sorted(p.stem for p in (CONFIG_DIR / "cache").glob("*.yaml"))
# A data-stage build needs input; the file need not exist for validation.
INPUT = "input.paths=[rows.jsonl]"


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_configs()


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose("data", overrides=overrides)


def _preset_values(group: str, name: str) -> dict:
    values = yaml.safe_load((CONFIG_DIR / group / f"{name}.yaml").read_text())
    values.pop("defaults", None)
    return values


def test_presets_exist():
    assert "toy" in TARGET_PRESETS and len(TARGET_PRESETS) >= 2
    expected = {f"{f}_{d}" for f, d in itertools.product(("parquet", "webdataset"), ("bf16", "fp16", "fp8", "int8"))}
    assert set(CACHE_PRESETS) == expected


@pytest.mark.parametrize("name", TARGET_PRESETS)
def test_target_preset_composes_and_validates(name):
    obj = to_dataclass(_compose([f"target={name}", INPUT]), DataStageConfig)
    assert isinstance(obj, DataStageConfig)
    values = _preset_values("target", name)
    assert values, f"configs/target/{name}.yaml sets nothing"
    for key, value in values.items():
        assert getattr(obj.target, key) == value, f"target.{key} of preset {name}"
    # The layer count stated in the preset's comment bounds its layer ids.
    m = re.search(r"(\d+)[ -]layers?\b", (CONFIG_DIR / "target" / f"{name}.yaml").read_text())
    assert m, f"configs/target/{name}.yaml does not state its layer count"
    assert all(-1 <= i < int(m.group(1)) for i in obj.target.layer_ids), (name, obj.target.layer_ids, m.group(0))


@pytest.mark.parametrize("name", CACHE_PRESETS)
def test_cache_preset_composes_and_validates(name):
    obj = to_dataclass(_compose([f"cache={name}", INPUT]), DataStageConfig)
    values = _preset_values("cache", name)
    for key, value in values.items():
        assert getattr(obj.cache, key) == value, f"cache.{key} of preset {name}"
    fmt, dtype = name.split("_")
    assert (obj.cache.format, obj.cache.storage_dtype) == (fmt, dtype)


def test_defaults_compose_to_toy_parquet_bf16():
    obj = to_dataclass(_compose([INPUT]), DataStageConfig)
    assert obj.target.name_or_path == "toy"
    assert (obj.cache.format, obj.cache.storage_dtype) == ("parquet", "bf16")
    assert obj.input.paths == ["rows.jsonl"]


def test_build_without_input_is_rejected_but_verify_is_not():
    with pytest.raises(ConfigError) as e:
        to_dataclass(_compose([]), DataStageConfig)
    assert "- input.paths" in str(e.value)
    obj = to_dataclass(_compose(["command=verify"]), DataStageConfig)
    assert obj.command == "verify"


BAD = [
    (["cache.storage_dtype=fp4"], "cache.storage_dtype"),
    (["cache.format=zip"], "cache.format"),
    (["cache.compression=brotli"], "cache.compression"),
    (["cache.samples_per_shard=0"], "cache.samples_per_shard"),
    (["cache.topk_logprobs=-1"], "cache.topk_logprobs"),
    (["regenerate.enabled=true", "regenerate.backend=openai"], "regenerate.url"),
    (["regenerate.backend=vllm"], "regenerate.backend"),
    (["regenerate.top_p=0"], "regenerate.top_p"),
    (["regenerate.max_new_tokens=0"], "regenerate.max_new_tokens"),
    (["min_loss_tokens=1024", "max_length=1024"], "min_loss_tokens"),
    (["min_loss_tokens=2000", "max_length=1024"], "min_loss_tokens"),
    (["max_length=1", "min_loss_tokens=1"], "max_length"),  # also min_loss_tokens >= max_length
    (["batch_size=0"], "batch_size"),
    (["command=train"], "command"),
    (["target.dtype=float64"], "target.dtype"),
    (["target.device=tpu"], "target.device"),
    (["target.layer_ids=[1,1]"], "target.layer_ids"),
    (["target.layer_ids=[-2,3]"], "target.layer_ids"),
    (["target.layer_ids=[]"], "target.layer_ids"),
    (["input.max_malformed_fraction=1.5"], "input.max_malformed_fraction"),
    (["input.max_rows=0"], "input.max_rows"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[k + ":" + ",".join(o) for o, k in BAD])
def test_bad_value_names_full_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        to_dataclass(_compose(overrides + [INPUT]), DataStageConfig)
    msg = str(e.value)
    # Each problem is a "  - <full key>..." line; the key must be spelled in full with its section.
    problems = [line.strip()[2:] for line in msg.splitlines() if line.strip().startswith("- ")]
    assert any(p.startswith(key + "=") or p.startswith(key + " ") for p in problems), msg
    # Only the overridden keys are blamed (max_length=1 necessarily also breaks min_loss_tokens < max_length).
    touched = {o.split("=")[0] for o in overrides} | {key}
    assert all(re.match(r"[\w.]+", p).group(0) in touched for p in problems), msg


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as e:
        to_dataclass(_compose(["cache.storage_dtype=fp4", "target.dtype=float64", "regenerate.top_p=2", INPUT]),
                     DataStageConfig)
    msg = str(e.value)
    for key in ("cache.storage_dtype", "target.dtype", "regenerate.top_p"):
        assert f"- {key}" in msg


def test_openai_rules_apply_only_when_enabled_and_urlless():
    ok = to_dataclass(_compose(["regenerate.backend=openai", INPUT]), DataStageConfig)  # not enabled
    assert ok.regenerate.backend == "openai"
    ok = to_dataclass(_compose(["regenerate.enabled=true", "regenerate.backend=openai",
                                "regenerate.url=http://localhost:8000", INPUT]), DataStageConfig)
    assert ok.regenerate.url == "http://localhost:8000"


@pytest.mark.parametrize("override", ["foo=1", "cache.bogus=1", "target.layers=[1]", "regenerate.nope=2"])
def test_unknown_key_rejected_by_hydra(override):
    with pytest.raises(ConfigCompositionException):
        _compose([override, INPUT])


@pytest.mark.parametrize("override", ["cache.samples_per_shard=abc", "max_length=long", "regenerate.enabled=maybe"])
def test_wrongly_typed_value_rejected_by_hydra(override):
    with pytest.raises(ConfigCompositionException):
        _compose([override, INPUT])


def test_unknown_key_rejected_by_to_dataclass():
    with pytest.raises(ConfigError, match=r"- cache\.bogus: Key 'bogus' not in 'CacheConfig'"):
        to_dataclass(OmegaConf.create({"cache": {"bogus": 1}, "input": {"paths": ["a"]}}), DataStageConfig)
    with pytest.raises(ConfigError, match=r"- bogus: "):
        to_dataclass(OmegaConf.create({"bogus": 1, "input": {"paths": ["a"]}}), DataStageConfig)


@pytest.mark.parametrize("override", ["+cache.storage_dtyp=fp8", "+foo=1"])
def test_appended_unknown_key_rejected(override):
    with pytest.raises((ConfigKeyError, ConfigCompositionException, ConfigError)):
        to_dataclass(_compose([override, INPUT]), DataStageConfig)


# ----------------------------------------------------------------------------- train stage
DRAFTER_PRESETS = sorted(p.stem for p in (CONFIG_DIR / "drafter").glob("*.yaml"))


def _compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose("train", overrides=overrides)


def test_every_yaml_in_configs_is_covered_by_a_test():
    covered = ({f"target/{n}" for n in TARGET_PRESETS} | {f"cache/{n}" for n in CACHE_PRESETS}
               | {f"drafter/{n}" for n in DRAFTER_PRESETS} | {"data", "train", "eval", "wandb/default"}
               | {"reproduce/toy"}  # tests/test_study.py
               | {"recipe/train/toy", "recipe/data/toy", "recipe/drafter/toy_dspark", "recipe/drafter/toy_dflash"})  # test_recipe.py
    on_disk = {str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml")
               if "hydra" not in p.parts}
    assert on_disk <= covered, on_disk - covered


@pytest.mark.parametrize("name", DRAFTER_PRESETS)
def test_drafter_preset_composes_into_a_valid_drafter_config(name):
    from deepspec.config import TrainStageConfig
    from deepspec.config.train import drafter_config

    # a real target: the toy's recipe (configs/recipe/) would override the preset's layer count
    obj = to_dataclass(_compose_train([f"drafter={name}", "cache_dir=somewhere", "target=qwen3_8b"]), TrainStageConfig)
    dcfg = drafter_config(obj.drafter)
    values = yaml.safe_load((CONFIG_DIR / "drafter" / f"{name}.yaml").read_text())["drafter"]
    assert obj.drafter["name"] == values["name"] == name.removesuffix("_debug")
    for key, value in values.items():
        if key != "name":
            assert getattr(dcfg, key) == value, (name, key)


def test_train_config_errors_name_the_key():
    from deepspec.config import TrainStageConfig
    from deepspec.config.train import drafter_config

    with pytest.raises(ConfigError, match=r"cache_dir is required"):
        to_dataclass(_compose_train([]), TrainStageConfig)
    with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage=5"):
        to_dataclass(_compose_train(["cache_dir=x", "deepspeed.zero_stage=5"]), TrainStageConfig)
    with pytest.raises(ConfigError, match=r"global_batch_size=3 is not a multiple of micro_batch_size=2"):
        to_dataclass(_compose_train(["cache_dir=x", "global_batch_size=3", "micro_batch_size=2"]), TrainStageConfig)
    with pytest.raises(ValueError, match=r"drafter\.markov_rnk"):
        drafter_config({"name": "dspark", "markov_rnk": 3})


def test_eval_config_composes_and_requires_a_drafter():
    from deepspec.config import EvalStageConfig

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("eval", overrides=["drafter_path=some/export"])
        bad = compose("eval", overrides=["temperature=-1"])
    obj = to_dataclass(cfg, EvalStageConfig)
    assert obj.temperature == 1.0 and [d.name for d in obj.datasets] == ["toy_heldout", "humaneval"]
    with pytest.raises(ConfigError, match=r"drafter_path is required[\s\S]*temperature=-1"):
        to_dataclass(bad, EvalStageConfig)


# ----------------------------------------------------------------------------- W&B section (all stages)
@pytest.mark.parametrize("stage", ["data", "train", "eval"])
def test_wandb_section_takes_its_defaults_from_the_environment(stage, monkeypatch):
    from deepspec.config import EvalStageConfig, TrainStageConfig

    schema, needed = {"data": (DataStageConfig, [INPUT]), "train": (TrainStageConfig, ["cache_dir=c"]),
                      "eval": (EvalStageConfig, ["drafter_path=d"])}[stage]

    def compose_stage():
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            return to_dataclass(compose(stage, overrides=needed), schema)

    for var in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "DEEPSPEC_RUN_GROUP"):
        monkeypatch.delenv(var, raising=False)
    plain = compose_stage().wandb
    assert (plain.mode, plain.project, plain.entity, plain.group) == ("disabled", "deepspec", None, None)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "drafters")
    monkeypatch.setenv("DEEPSPEC_RUN_GROUP", "pipe-7")
    env = compose_stage().wandb
    assert (env.mode, env.project, env.group) == ("offline", "drafters", "pipe-7")
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match=r"wandb\.mode='sometimes'"):
        compose_stage()


# ----------------------------------------------------------------------------- Hydra launchers (cluster)
@pytest.mark.parametrize("launcher,target_cls", [("submitit_slurm", "SlurmLauncher"), ("submitit_local", "LocalLauncher")])
def test_submitit_launcher_configs_compose_with_the_plugin_schema(launcher, target_cls, monkeypatch):
    monkeypatch.setenv("DEEPSPEC_SLURM_PARTITION", "gpu-long")
    monkeypatch.setenv("DEEPSPEC_GPUS_PER_NODE", "8")
    monkeypatch.setenv("DEEPSPEC_SLURM_TIME_MIN", "1440")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}", "cache_dir=c"], return_hydra_config=True)
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg._target_.endswith(target_cls)
    assert launcher_cfg.timeout_min == 1440
    if launcher == "submitit_slurm":
        assert (launcher_cfg.partition, launcher_cfg.tasks_per_node, launcher_cfg.gpus_per_node) == ("gpu-long", 8, 8)
        assert launcher_cfg.max_num_timeout > 0 and launcher_cfg.signal_delay_s >= 60  # requeue before the limit
    with pytest.raises(Exception, match="timeout_min"):  # the plugin's schema types our YAML
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            compose("train", overrides=[f"hydra/launcher={launcher}", "hydra.launcher.timeout_min=soon"], return_hydra_config=True)


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3"}, (1, 3)),
    ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2"}, (2, 4)),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "2",
      "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3"}, (7, 8)),
    ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2", "RANK": "2"}, None),  # torchrun coordinates instead
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, None),  # the batch script itself is no part
    ({"DEEPSPEC_PART": "0", "DEEPSPEC_PARTS": "2", "RANK": "0"}, (0, 2)),
])
def test_independent_part_from_the_slurm_environment(env, expected, monkeypatch):
    from deepspec.data.build import independent_part

    for var in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT", "SLURM_STEP_NUM_TASKS",
                "SLURM_PROCID", "SLURM_NTASKS", "RANK", "DEEPSPEC_PART", "DEEPSPEC_PARTS"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert independent_part() == expected
