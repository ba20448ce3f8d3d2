#!/usr/bin/env python
"""Reproduce the DSpark paper's claims at small scale: one command, end to end.

    python scripts/reproduce.py --quick            # the same study, small (< 20 min on 2 CPU cores)
    python scripts/reproduce.py                    # the committed study (eval/results/)
    python scripts/reproduce.py --config configs/reproduce/toy.yaml steps=800 rows=2000   # dotlist overrides
    python scripts/reproduce.py --report-only      # rebuild README/plots from results/runs/*.json

Work files (cache, checkpoints, logs) go to --work; results (one JSON per run, study.json, README.md,
plots) to --results. A rerun skips what is finished; a run recorded in --results with the same
arguments, on a cache with the same settings and counts, is kept even when --work is gone. See deepspec/evaluation/study.py.
"""
import argparse
import logging
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepspec.evaluation.study import Study, load_study_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/reproduce/toy.yaml")
    ap.add_argument("--quick", action="store_true", help="apply the config's quick block")
    ap.add_argument("--work", default=None, help="default runs/reproduce[_quick]")
    ap.add_argument("--results", default=None, help="default eval/results (full) or runs/reproduce_quick/results")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the study config")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = load_study_config(args.config, args.quick, args.overrides)
    work = Path(args.work or ("runs/reproduce_quick" if args.quick else "runs/reproduce"))
    results = Path(args.results or (work / "results" if args.quick else "eval/results"))
    command = " ".join(["python scripts/reproduce.py", *(["--quick"] if args.quick else []),
                        *([f"--config {args.config}"] if args.config != ap.get_default("config") else []),
                        *([f"--work {args.work}"] if args.work else []), *([f"--results {args.results}"] if args.results else []),
                        *map(shlex.quote, args.overrides)])
    study = Study(cfg, work, results, quick=args.quick, command=command)
    if args.report_only:
        study.report_only()
    else:
        study.run()
    print(f"report: {results / 'README.md'}")


if __name__ == "__main__":
    main()
