#!/usr/bin/env python
"""Mutation check: apply each single-line mutation of the core math, run the tests that guard it,
restore the file, and report whether the tests caught it.

    python scripts/mutation_check.py [--only NAME-SUBSTRING] [--out runs/mutations.json]

The list lives in tests/mutations.py (beside the tests that kill them). Prints one line per mutation
(KILLED / SURVIVED) and a JSON summary; exits non-zero if any mutation survives or no longer applies.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from mutations import MUTATIONS  # noqa: E402


def run(selection: str) -> int:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--no-header", *shlex.split(selection)]
    return subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default="runs/mutations.json")
    args = ap.parse_args()
    results, t0 = [], time.time()
    for name, file, old, new, tests in MUTATIONS:
        if args.only not in name:
            continue
        path = REPO / file
        src = path.read_text()
        if src.count(old) != 1:
            results.append({"name": name, "file": file, "status": "STALE", "detail": f"original text found {src.count(old)} times"})
            print(f"STALE     {name}  ({file}: original text found {src.count(old)} times)", flush=True)
            continue
        t = time.time()
        try:
            path.write_text(src.replace(old, new))
            rc = run(tests)
        finally:
            path.write_text(src)
        status = "KILLED" if rc != 0 else "SURVIVED"
        results.append({"name": name, "file": file, "status": status, "tests": tests, "seconds": round(time.time() - t, 1)})
        print(f"{status:9s} {name}  ({file}, {time.time() - t:.0f} s)", flush=True)
    summary = {"mutations": len(results), "killed": sum(r["status"] == "KILLED" for r in results),
               "survived": [r["name"] for r in results if r["status"] == "SURVIVED"],
               "stale": [r["name"] for r in results if r["status"] == "STALE"], "seconds": round(time.time() - t0), "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=1))
    sys.exit(1 if summary["survived"] or summary["stale"] else 0)


if __name__ == "__main__":
    main()
