"""``deepspec-doctor``: what this machine can run, and the exact next command.

Prints torch / CUDA / Triton / DeepSpeed / Slurm / W&B availability, the CPU flags that decide the
precision (and what ``precision=auto`` picks here), threads, and free disk where the runs go.
Every probe is guarded: a broken or missing component is reported in one line, never as a
traceback. Exit status 1 when something the pipeline needs is missing, else 0.

    deepspec-doctor [--runs-dir runs] [--json]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

# The toy demo's cache and runs take about this much disk (measured: runs/demo is ~0.4 GB).
DEMO_DISK_GB = 1.0


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception:  # noqa: BLE001 -- any import failure means "not usable here"
        return None


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def probe(runs_dir: Path) -> dict:
    """Every check as plain data (what ``--json`` prints)."""
    out: dict = {"python": sys.version.split()[0], "platform": platform.platform(), "cores": os.cpu_count(), "problems": []}
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        out["problems"].append(f"torch cannot be imported ({e}): run scripts/test.sh or scripts/demo.sh, which install it")
        return out
    from deepspec.precision import CPU_BF16_FLAGS, cpu_flags, cpu_name, native_bf16, resolve_precision

    out["cpu"] = cpu_name()
    out["torch"] = torch.__version__
    out["threads"] = torch.get_num_threads()
    flags = cpu_flags()
    out["cpu_flags"] = {f: f in flags for f in ("avx2", "avx512f", *CPU_BF16_FLAGS)}
    cuda = torch.cuda.is_available()
    out["cuda"] = {"available": cuda, "version": torch.version.cuda,
                   "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []}
    device = torch.device("cuda" if cuda else "cpu")
    out["precision_auto"] = resolve_precision("auto", device, "training")
    out["precision_why"] = native_bf16(device)[1]
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")  # else DeepSpeed warns while probing for one
    out["precision_pin"] = os.environ.get("DEEPSPEC_AUTO_PRECISION")
    out["triton"] = _version("triton")
    out["triton_kernels"] = "used (CUDA)" if cuda and out["triton"] else "not used: the PyTorch reference kernels run"
    out["deepspeed"] = _version("deepspeed")
    if out["deepspeed"] is None:
        out["problems"].append("deepspeed cannot be imported: training needs it (pip install -e '.[dev]')")
    out["c_compiler"] = shutil.which("c++") or shutil.which("g++")
    if out["c_compiler"] is None and not cuda:
        out["problems"].append("no C++ compiler: DeepSpeed cannot build its CPU communication op (apt install g++)")
    out["transformers"] = _version("transformers")
    out["wandb"] = {"version": _version("wandb"), "mode": os.environ.get("WANDB_MODE", "(unset: wandb.mode from config)")}
    out["slurm"] = {"sbatch": shutil.which("sbatch"), "nodes": _run(["sinfo", "-h", "-o", "%D %T"])}
    runs_dir = runs_dir.resolve()
    existing = next(p for p in [runs_dir, *runs_dir.parents] if p.exists())
    free_gb = shutil.disk_usage(existing).free / 2**30
    out["disk"] = {"path": str(runs_dir), "free_gb": round(free_gb, 1)}
    if free_gb < DEMO_DISK_GB:
        out["problems"].append(f"{free_gb:.1f} GB free under {existing}: the demo needs about {DEMO_DISK_GB:.0f} GB")
    return out


def next_command(info: dict) -> str:
    if info["problems"]:
        return "fix the problems above, then run: deepspec-doctor"
    if info.get("cuda", {}).get("available"):
        n = len(info["cuda"]["devices"])
        return (f"scripts/demo.sh   # then, for a real target: torchrun --nproc_per_node {n} train/train.py "
                f"target=qwen3_8b drafter=dspark cache_dir=<cache>")
    return "scripts/demo.sh   # the whole pipeline on the embedded toy target (CPU)"


def report(info: dict) -> str:
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    lines = [f"python {info['python']} on {info['platform']}, {info['cores']} cores"]
    if "torch" in info:
        flags = ", ".join(f"{k} {yes(v)}" for k, v in info["cpu_flags"].items())
        cuda = info["cuda"]
        lines += [
            f"cpu: {info['cpu']}",
            f"torch {info['torch']}, {info['threads']} threads",
            f"cpu flags: {flags}",
            f"cuda: {', '.join(cuda['devices']) + ' (CUDA ' + str(cuda['version']) + ')' if cuda['available'] else 'none'}",
            f"precision=auto picks: {info['precision_auto']} ({info['precision_why']})"
            + (f" (pinned by DEEPSPEC_AUTO_PRECISION={info['precision_pin']})" if info["precision_pin"] else ""),
            f"triton: {info['triton'] or 'not installed'}; kernels: {info['triton_kernels']}",
            f"deepspeed: {info['deepspeed'] or 'MISSING'}; c++ compiler: {info['c_compiler'] or 'none'}",
            f"transformers: {info['transformers']}; wandb: {info['wandb']['version']} (WANDB_MODE {info['wandb']['mode']})",
            f"slurm: {'sbatch at ' + info['slurm']['sbatch'] if info['slurm']['sbatch'] else 'not installed (local runs only)'}"
            + (f", nodes: {info['slurm']['nodes']}" if info["slurm"]["nodes"] else ""),
            f"disk: {info['disk']['free_gb']} GB free for {info['disk']['path']}",
        ]
    lines += [f"PROBLEM: {p}" for p in info["problems"]] or ["no problems found"]
    lines.append(f"next: {next_command(info)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="deepspec-doctor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs-dir", default="runs", help="where caches and runs will be written (free disk is checked)")
    ap.add_argument("--json", action="store_true", help="print the checks as JSON")
    args = ap.parse_args(argv)
    info = probe(Path(args.runs_dir))
    print(json.dumps({**info, "next": next_command(info)}, indent=1) if args.json else report(info))
    return 1 if info["problems"] else 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
