"""Generated bad configs (Hypothesis): any value of any wrong type or range, at any key of every stage's
config, gets an error that names the key, or is a valid config. Never another exception (a traceback
from deep inside a stage), never a non-finite number accepted."""
from __future__ import annotations

import dataclasses
import math
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from deepspec.config import ConfigError, DataStageConfig, EvalStageConfig, TrainStageConfig, to_dataclass
from deepspec.config.study import StudyConfig

# A minimal valid config per stage; each example changes one key of it.
BASES = {
    DataStageConfig: {"input": {"paths": ["rows.jsonl"]}},
    TrainStageConfig: {"cache_dir": "cache", "drafter": {"name": "dspark"}},
    EvalStageConfig: {"drafter_path": "export"},
    StudyConfig: {"drafters": {"d": {"preset": "dspark"}}, "experiments": {"headline": {"drafters": ["d"]}},
                  "eval_sets": [{"name": "a"}]},
}


def leaf_keys(schema, prefix: str = "") -> list[tuple[str, object]]:
    """Dotted keys of every scalar/list field of a config dataclass tree, with their annotations."""
    hints = typing.get_type_hints(schema)
    out = []
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += leaf_keys(tp, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", tp))
    return out


BAD_VALUES = st.one_of(
    st.integers(-(10**12), 10**12), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.text(max_size=12), st.lists(st.integers(-5, 5), max_size=4), st.lists(st.text(max_size=4), max_size=3),
    st.sampled_from(["-1", "0", "1e309", "nan", "inf", "../..", "", "auto", "\x00", "fp4"]),
)
CASES = [(schema, key) for schema in BASES for key, _ in leaf_keys(schema)]
KEYS = {schema: sorted({k for k, _ in leaf_keys(schema)} | {k.rsplit(".", 1)[0] for k, _ in leaf_keys(schema)} | {"drafter."},
                       key=len, reverse=True) for schema in BASES}


def _non_finite(x) -> bool:
    if isinstance(x, float):
        return not math.isfinite(x)
    if isinstance(x, (list, tuple)):
        return any(_non_finite(v) for v in x)
    if dataclasses.is_dataclass(x):
        return any(_non_finite(getattr(x, f.name)) for f in dataclasses.fields(x))
    return False


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(CASES), value=BAD_VALUES)
def test_a_bad_value_at_any_key_is_named_or_valid(case, value):
    schema, key = case
    cfg = OmegaConf.create(BASES[schema])
    try:
        OmegaConf.update(cfg, key, value, force_add=True)
        obj = to_dataclass(cfg, schema)
    except ConfigError as e:
        # every problem line names a key of this schema (the changed one, or one it made required)
        lines = [ln.strip()[2:] for ln in str(e).splitlines() if ln.strip().startswith("- ")]
        assert lines and all(any(ln.startswith(k) for k in KEYS[schema]) for ln in lines), f"{key}={value!r}: {e}"
        return
    except OmegaConfBaseException as e:  # type mismatch / unknown key, raised by OmegaConf with the full key
        assert key.split(".")[-1] in str(e), f"{key}={value!r}: {e}"
        return
    # accepted: then the value must have survived as a finite, well-typed value
    assert not _non_finite(_get(obj, key)), f"{key}={value!r} accepted a non-finite number"


@pytest.mark.parametrize("schema", list(BASES), ids=lambda s: s.__name__)
def test_the_minimal_bases_are_valid(schema):
    to_dataclass(OmegaConf.create(BASES[schema]), schema)


SIZE = ("size", "steps", "rows", "tokens", "prompts", "workers", "anchors", "keep_last", "max_samples", "shards", "length")

def _int_size_keys():
    out = []
    for schema in BASES:
        for key, tp in leaf_keys(schema):
            if tp in (int, typing.Optional[int]) and key.split(".")[-1].endswith(SIZE):
                out.append((schema, key))
    return out


@pytest.mark.parametrize("schema,key", _int_size_keys(), ids=lambda x: getattr(x, "__name__", x))
def test_a_negative_size_is_refused_by_name(schema, key):
    cfg = OmegaConf.create(BASES[schema])
    OmegaConf.update(cfg, key, -3, force_add=True)
    with pytest.raises(ConfigError, match=rf"{key.split('.')[-1]}=-3"):
        to_dataclass(cfg, schema)
