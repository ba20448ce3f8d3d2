#!/usr/bin/env python
"""Everything this project's CUDA path needs checked and measured, on one GPU, in under 8 minutes.

    scripts/gpu_check.sh                 # on a GPU: writes eval/results/benchmarks/gpu_<device>_<date>.{json,md}
    scripts/gpu_check.sh --dry-run       # the same code at tiny shapes on the CPU (the test suite runs this): runs/gpu_check_dry_run/

Sections, each timed, each one's failure recorded, not fatal (in brackets: estimated seconds on an H100, not yet measured):
    cuda_tests        pytest tests/gpu with the Triton interpreter off (kernels vs reference at real shapes,
                      flex vs sdpa training, DeepSpeed ZeRO-2 bf16 vs CPU fp32, exact law and greedy identity) [~150]
    decoding          deepspec.evaluation.gpu_check.decoding_physics on a random Qwen3-8B + DSpark          [~90]
    training          training_speed, full vocabulary and reduced (32,768)                                  [~60]
    memory            training_memory: largest micro-batch at 4k / 8k tokens, the loss chunking's saving    [~90]
A section starts only if its estimate still fits the budget (``--budget-s``, 480 s); one that would not is recorded as
skipped. The dry run has no budget (a loaded CI machine is slow, and every section must run there).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from deepspec.evaluation import gpu_check as gc
from deepspec.evaluation.gpu_check_report import summary

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("cuda_tests", "decoding", "training", "memory")
ESTIMATE_S = {"cuda_tests": 150, "decoding": 90, "training": 60, "memory": 90}  # on an H100; not yet measured


def cuda_tests(out_dir: Path) -> dict:
    """tests/gpu in its own process with the interpreter off: Triton reads TRITON_INTERPRET when a kernel is decorated,
    and tests/conftest.py turns it on for the CPU suite (TRITON_INTERPRET=0 here wins: conftest only sets a default)."""
    xml = out_dir / "gpu_tests.xml"
    env = {**os.environ, "TRITON_INTERPRET": "0", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "gpu"), f"--junitxml={xml}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=270)
    cases = ET.parse(xml).getroot().iter("testcase")
    outcome = {"passed": [], "failed": [], "skipped": []}
    skip_reasons = set()
    for case in cases:
        name = f"{case.get('classname')}.{case.get('name')}"
        skipped = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            outcome["failed"].append(name)
        elif skipped is not None:
            outcome["skipped"].append(name)
            skip_reasons.add(skipped.get("message", ""))
        else:
            outcome["passed"].append(name)
    xml.unlink()
    return {"returncode": proc.returncode, **{k: len(v) for k, v in outcome.items()}, "failed_tests": outcome["failed"],
            "skip_reasons": sorted(skip_reasons), "tail": proc.stdout[-3000:] if outcome["failed"] else proc.stdout[-300:]}


def guarded(job) -> dict:
    """{"status": "ok", **job()}, or the error: one failure is a finding, and what follows still runs."""
    try:
        return {"status": "ok", **job()}
    except Exception as e:  # noqa: BLE001
        gc.free_memory()
        return {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}


def run_sections(args, shape: gc.CheckShape, device: torch.device) -> dict:
    jobs = {"cuda_tests": lambda: cuda_tests(args.out_dir),
            "decoding": lambda: gc.decoding_physics(shape, device),
            "training": lambda: {"full_vocab": guarded(lambda: gc.training_speed(shape, device, reduced_vocab=False)),
                                 "reduced_vocab": guarded(lambda: gc.training_speed(shape, device, reduced_vocab=True))},
            "memory": lambda: gc.training_memory(shape, device)}
    start, out = time.perf_counter(), {}
    for name in args.sections:
        elapsed = time.perf_counter() - start
        if not args.dry_run and elapsed + ESTIMATE_S[name] > args.budget_s:
            out[name] = {"status": "skipped", "seconds": 0.0,
                         "reason": f"at {elapsed:.0f} s its ~{ESTIMATE_S[name]} s would pass the {args.budget_s:.0f} s budget"}
        else:
            t = time.perf_counter()
            out[name] = guarded(jobs[name])
            out[name]["seconds"] = time.perf_counter() - t
        print(f"[gpu_check] {name}: {out[name]['status']} in {out[name]['seconds']:.1f} s", flush=True)
    if out.get("cuda_tests", {}).get("failed"):
        out["cuda_tests"]["status"] = "failed"
    if any(v.get("status") == "error" for v in out.get("training", {}).values() if isinstance(v, dict)):
        out["training"]["status"] = "error"
    return out


def git_commit() -> str:
    run = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa: E731
    sha = run("rev-parse", "--short", "HEAD") or "unknown"
    return sha + ("+dirty" if run("status", "--porcelain", "--untracked-files=no") else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (what CI runs)")
    ap.add_argument("--out-dir", type=Path, help="default: eval/results/benchmarks (GPU), runs/gpu_check_dry_run (--dry-run)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole run (sections that would pass it are skipped)")
    args = ap.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; `--dry-run` runs the same code at tiny shapes on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    args.out_dir = args.out_dir or REPO / ("runs/gpu_check_dry_run" if args.dry_run else "eval/results/benchmarks")
    shape = gc.TINY if args.dry_run else gc.QWEN3_8B
    args.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = gc.device_info(device)
    result = {"commit": git_commit(), "date": datetime.date.today().isoformat(), "device": info, "dry_run": args.dry_run,
              "torch": torch.__version__, "shape": gc.shape_dict(shape), "sections": run_sections(args, shape, device)}
    result["seconds"] = time.perf_counter() - t0
    slug = "dryrun_cpu" if args.dry_run else "gpu_" + re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-")
    stem = args.out_dir / f"{slug}_{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    stem.with_suffix(".md").write_text(summary(result))
    print(f"[gpu_check] wrote {stem}.json and .md in {result['seconds']:.0f} s", flush=True)
    bad = [n for n, s in result["sections"].items() if s["status"] not in ("ok", "skipped")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
