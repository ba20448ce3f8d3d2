"""precision=auto: bf16 only where the hardware runs it natively (CPU flags mocked), fp32 otherwise."""
from __future__ import annotations

import logging

import pytest
import torch

from deepspec import precision
from deepspec.config import check
from deepspec.config.data import TargetConfig
from deepspec.config.train import DeepSpeedConfig, TrainStageConfig
from deepspec.training.engine import deepspeed_config

AVX2_EPYC = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma"})  # what the CI machine kind may have
SAPPHIRE_RAPIDS = AVX2_EPYC | {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def real_auto(monkeypatch):
    """These tests check the hardware rule itself, not the suite's fp32 pin."""
    monkeypatch.delenv("DEEPSPEC_AUTO_PRECISION", raising=False)
    precision._logged.clear()


@pytest.mark.parametrize("flags,expected", [(AVX2_EPYC, "fp32"), (SAPPHIRE_RAPIDS, "bf16"),
                                            (AVX2_EPYC | {"avx512_bf16"}, "bf16"), (frozenset(), "fp32")])
def test_auto_picks_bf16_only_with_native_cpu_support(flags, expected, caplog):
    with caplog.at_level(logging.INFO, logger="deepspec.precision"):
        assert precision.resolve_precision("auto", CPU, "training", flags) == expected
        precision.resolve_precision("auto", CPU, "training", flags)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and f"-> {expected}" in lines[0]  # the choice and its reason, logged once


def test_auto_uses_the_machines_flags(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: AVX2_EPYC)
    assert precision.resolve_dtype("auto", CPU) == torch.float32
    monkeypatch.setattr(precision, "cpu_flags", lambda: SAPPHIRE_RAPIDS)
    assert precision.resolve_dtype("auto", CPU) == torch.bfloat16


def test_explicit_precision_is_honoured_with_a_warning_when_emulated(caplog):
    with caplog.at_level(logging.WARNING, logger="deepspec.precision"):
        assert precision.resolve_precision("bf16", CPU, "training", AVX2_EPYC) == "bf16"
        assert precision.resolve_precision("bfloat16", CPU, "target", SAPPHIRE_RAPIDS) == "bf16"
        assert precision.resolve_precision("fp32", CPU, "eval", AVX2_EPYC) == "fp32"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "emulated" in warnings[0] and "training" in warnings[0]


def test_environment_pin_and_bad_values(monkeypatch):
    monkeypatch.setenv("DEEPSPEC_AUTO_PRECISION", "fp32")
    assert precision.resolve_precision("auto", CPU, "training", SAPPHIRE_RAPIDS) == "fp32"
    monkeypatch.setenv("DEEPSPEC_AUTO_PRECISION", "fp8")
    with pytest.raises(ValueError, match="DEEPSPEC_AUTO_PRECISION"):
        precision.resolve_precision("auto", CPU, "training")
    with pytest.raises(ValueError, match="'int4'"):
        precision.resolve_precision("int4", CPU, "training")


def test_auto_is_the_default_and_reaches_deepspeed(monkeypatch):
    assert TargetConfig().dtype == "auto" and DeepSpeedConfig().precision == "auto"
    cfg = TrainStageConfig(target=TargetConfig(), drafter={"name": "dspark"}, cache_dir="unused")
    check(cfg)
    monkeypatch.setattr(precision, "cpu_flags", lambda: AVX2_EPYC)
    assert deepspeed_config(cfg, 1, CPU)["bf16"]["enabled"] is False
    monkeypatch.setattr(precision, "cpu_flags", lambda: SAPPHIRE_RAPIDS)
    assert deepspeed_config(cfg, 1, CPU)["bf16"]["enabled"] is True
