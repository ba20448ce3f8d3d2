"""Which floating-point precision to compute in, from what the hardware runs natively.

bf16 is fast only where the hardware has it: CUDA GPUs with bf16 support (Ampere and later), and
x86 CPUs with AVX512_BF16 or AMX. Elsewhere PyTorch emulates it and a bf16 training step is an
order of magnitude slower than fp32 (measured: 25.5 s vs 2.2 s on a 2-core AVX2 EPYC, see
``scripts/bench_precision.py``). So every stage takes ``auto`` by default: bf16 where native,
fp32 otherwise, with the choice and its reason logged once. An explicit bf16/fp16 is honoured,
with a warning when the hardware would emulate it.

``DEEPSPEC_AUTO_PRECISION=fp32`` (or bf16) makes ``auto`` pick that on every machine: the test
suite sets it so that results do not depend on whether the CPU happens to have AMX.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# x86 /proc/cpuinfo flags that give native bf16 matmuls (oneDNN uses them).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Names the configs accept -> the short name DeepSpeed and the logs use.
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
LONG = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first CPU's fields in Linux ``/proc/cpuinfo`` ({} where it cannot be read)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for key, _, value in (line.partition(":") for line in lines):
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_name() -> str:
    """The CPU's model name, else what ``platform`` knows."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (x86 "flags", Arm "Features"; empty where unknown)."""
    info = _cpuinfo()
    return frozenset((info.get("flags") or info.get("Features") or "").split())


def native_bf16(device: torch.device, flags: frozenset[str] | None = None) -> tuple[bool, str]:
    """(does ``device`` run bf16 natively, why) -- the why is one short phrase for the logs."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, f"{torch.cuda.get_device_name(device)} {'supports' if ok else 'does not support'} bf16"
    if device.type != "cpu":
        return False, f"{device.type}: bf16 support unknown"
    flags = cpu_flags() if flags is None else flags
    have = [f for f in CPU_BF16_FLAGS if f in flags]
    cpu = cpu_name()
    if have:
        return True, f"CPU ({cpu}) has {'/'.join(have)}"
    return False, f"CPU ({cpu}) has no {' or '.join(CPU_BF16_FLAGS)}: bf16 would be emulated"


_logged: set[tuple] = set()


def resolve_precision(requested: str, device: torch.device, what: str, flags: frozenset[str] | None = None) -> str:
    """``requested`` (auto | fp32 | bf16 | fp16, or the torch names) -> fp32 | bf16 | fp16 for ``what``
    (e.g. "target", "training") on ``device``. Logs the choice once per (what, choice)."""
    native, why = native_bf16(device, flags)
    if requested == "auto":
        forced = os.environ.get("DEEPSPEC_AUTO_PRECISION")
        if forced is not None:
            if forced not in ("fp32", "bf16"):
                raise ValueError(f"DEEPSPEC_AUTO_PRECISION={forced!r}: expected fp32 or bf16")
            native, why = forced == "bf16", f"DEEPSPEC_AUTO_PRECISION={forced}"
        chosen = "bf16" if native else "fp32"
        _log_once(logging.INFO, what, chosen, f"precision=auto -> {chosen} for the {what}: {why}")
        return chosen
    if requested not in SHORT:
        raise ValueError(f"precision {requested!r} for the {what}: expected auto, fp32, bf16 or fp16")
    chosen = SHORT[requested]
    if chosen == "bf16" and not native:
        _log_once(logging.WARNING, what, chosen, f"bf16 for the {what} as configured, but {why}; it will be much slower "
                                                 f"than fp32 (use precision auto or fp32)")
    elif chosen == "fp16" and device.type == "cpu":
        _log_once(logging.WARNING, what, chosen, f"fp16 for the {what} on a CPU is emulated and slow (use auto or fp32)")
    return chosen


def resolve_dtype(requested: str, device: torch.device, what: str = "target") -> torch.dtype:
    """A config's dtype (auto | float32 | bfloat16 | float16) -> the torch dtype to load/compute in."""
    return getattr(torch, LONG[resolve_precision(requested, device, what)])


def _log_once(level: int, what: str, chosen: str, message: str) -> None:
    if (what, chosen) not in _logged:
        _logged.add((what, chosen))
        log.log(level, message)
