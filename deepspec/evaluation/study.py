"""The reproduction study: the paper's claims tested at small scale, end to end, with the real loop.

    1. cache     the target answers ``rows`` training prompts itself (regeneration), then its features
                 are cached once (data stage); every run reads the same cache
    2. train     every drafter x block size x seed of every experiment, at the same budget (steps, batch,
                 learning rate, data, parameters within ``param_tolerance``), through the train stage
    3. converge  read each run's validation curve: converged when the last ``convergence_window`` of
                 training improved the best validation loss by less than ``convergence_tolerance``
    4. eval      each run through the eval stage on held-out prompt sets: real speculative decoding at
                 T = 1 (sampled, STS fitted on the calibration prompts) and T = 0 (checked token for token
                 against plain greedy); one JSON per run under ``results_dir/runs``
    5. report    ``study_report.write_report``: tables, plots and a verdict per claim

Every stage runs as its own process through its entry point (what a user runs), so a study is also a
test of the pipeline. Finished steps are skipped on a rerun (a killed study resumes where it stopped).
"""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

from deepspec.config.base import check
from deepspec.config.study import BLOCK_DRAFTERS, StudyConfig
from deepspec.data.cache.manifest import build_plan
from deepspec.integrity import self_digest, sha256_file

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]


def load_study_config(path: str | Path, quick: bool = False, overrides: list[str] = ()) -> StudyConfig:
    """YAML (+ its ``quick`` block when ``quick``) + dotlist overrides -> a validated StudyConfig."""
    raw = OmegaConf.load(path)
    merged = OmegaConf.merge(OmegaConf.structured(StudyConfig), raw)
    if quick:
        merged = OmegaConf.merge(merged, OmegaConf.create(OmegaConf.to_container(merged.quick)))
    merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    cfg = OmegaConf.to_object(merged)
    check(cfg)
    return cfg


def device_info() -> dict:
    """What ran the study: CPU model, threads, torch, the precision ``auto`` resolves to, GPU if any."""
    import torch

    from deepspec.precision import cpu_name, resolve_precision

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    dev = torch.device("cuda" if gpu else "cpu")
    return {"device": gpu or cpu_name(), "cuda": bool(gpu), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "precision": resolve_precision("auto", dev, "training")}


class Study:
    def __init__(self, cfg: StudyConfig, work_dir: str | Path, results_dir: str | Path, quick: bool = False,
                 command: str = "python scripts/reproduce.py"):
        self.cfg, self.quick, self.command = cfg, quick, command  # command: how to rerun it, printed in the report
        self.work, self.results = Path(work_dir), Path(results_dir)
        self.cache_dir = self.work / "cache"
        (self.results / "runs").mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(parents=True, exist_ok=True)

    # -- helpers -----------------------------------------------------------------------------------
    def _run(self, name: str, argv: list[str]) -> float:
        """Run one stage's entry point (python <script> overrides...), its output in logs/<name>.log.
        Returns the wall time; a failure raises with the log's tail."""
        log_path = self.work / "logs" / f"{name}.log"
        env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"), "PYTHONUNBUFFERED": "1"}
        t = time.perf_counter()
        with open(log_path, "w") as f:
            rc = subprocess.run([sys.executable, *argv], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        if rc != 0:
            tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-25:])
            raise RuntimeError(f"{name} failed (exit {rc}); log {log_path}:\n{tail}")
        return time.perf_counter() - t

    def _run_once(self, name: str, argv: list[str], done: Path) -> float | None:
        """_run unless ``done`` exists. The wall time is kept in logs/<name>.seconds, so a study stopped
        between a stage and its run's record still reports it on resume (None: not measured).
        The stage's arguments (work folder written <work>) are kept in logs/<name>.argv.json when it
        starts. A stage left in the work folder with other arguments (e.g. a 600-step checkpoint when the
        config now says 3,000), or by a version that did not record them, is an error: never silently
        reused, nor resumed with the new arguments."""
        timing, recorded = self.work / "logs" / f"{name}.seconds", self.work / "logs" / f"{name}.argv.json"
        argv_here = relocated(argv, self.work)
        if recorded.exists():
            old = json.loads(recorded.read_text())
            same = result_settings(old) == result_settings(argv_here)
            problem = None if same else f"other arguments (differing: {sorted(set(old) ^ set(argv_here))})"
        else:
            problem = "arguments it did not record (made by an older deepspec)" if done.exists() else None
        if problem:
            raise RuntimeError(f"{name}: the work folder {self.work} holds this stage made with {problem}. Use another "
                               f"--work, or delete {done.parent} and {recorded} to redo this stage.")
        if done.exists():
            return float(timing.read_text()) if timing.exists() else None
        recorded.write_text(json.dumps(argv_here))
        seconds = self._run(name, argv)
        timing.write_text(f"{seconds}\n")
        return seconds

    def runs(self) -> list[dict]:
        """The unique (drafter, block size, seed) runs of all experiments, each with the experiments using it."""
        out: dict[str, dict] = {}
        for exp_name, exp in self.cfg.experiments.items():
            for d in exp.drafters:
                for g in exp.block_sizes:
                    for s in exp.seeds:
                        run_id = f"{d}_g{g}_s{s}"
                        out.setdefault(run_id, {"id": run_id, "drafter": d, "block_size": g, "seed": s, "experiments": []})
                        out[run_id]["experiments"].append(exp_name)
        return list(out.values())

    # -- 1. cache ------------------------------------------------------------------------------------
    def build_cache(self) -> dict:
        c = self.cfg
        manifest = self.cache_dir / "manifest.json"  # written last: its presence means the cache is complete
        built = manifest.exists()
        seconds = self._run_once("cache", [
            "data/cache.py", "build", f"target={c.target}", f"cache={c.cache}", f"input.paths=[{c.train_source}]",
            f"input.max_rows={c.rows}", "regenerate.enabled=true", f"regenerate.max_new_tokens={c.regenerate_max_new_tokens}",
            "regenerate.batch_size=32", f"out_dir={self.cache_dir}"], manifest)
        if not built:
            self._run("cache_verify", ["data/cache.py", "verify", f"target={c.target}", f"out_dir={self.cache_dir}"])
        m = json.loads(manifest.read_text())
        return {"manifest_sha256": sha256_file(manifest), "settings_sha256": self_digest(build_plan(m)), "counts": m["counts"],
                "build_seconds": seconds, "train_source_sha256": sha256_file(REPO / c.train_source)}

    # -- 2. train ------------------------------------------------------------------------------------
    def train_argv(self, run: dict) -> list[str]:
        c, d = self.cfg, self.cfg.drafters[run["drafter"]]
        block_key = "ttt_steps" if d.preset.startswith("eagle3") else "block_size"
        argv = ["train/train.py", f"target={c.target}", f"drafter={d.preset}", f"cache_dir={self.cache_dir}",
                f"run_dir={self.work / 'runs' / run['id']}", f"max_steps={c.steps}", f"seed={run['seed']}",
                f"global_batch_size={c.global_batch_size}", f"micro_batch_size={d.micro_batch_size or c.global_batch_size}", f"optim.lr={c.lr}",
                f"drafter.{block_key}={run['block_size']}", f"eval.val_fraction={c.val_fraction}",
                f"eval.every_steps={c.val_every_steps}", f"eval.max_samples={c.val_max_samples}",
                f"checkpoint.every_steps={min(c.checkpoint_every_steps, c.steps)}", "checkpoint.keep_last=1", f"logging.every_steps={c.val_every_steps}",
                "loss.recompute_logits=false"]  # small vocabularies: keep the logits, a third fewer matmuls
        if d.preset.split("_")[0] in BLOCK_DRAFTERS:
            argv.append(f"drafter.num_anchors={c.num_anchors}")
        argv += [f"drafter.{k}={v}" for k, v in d.fields.items()]
        return argv + list(c.train_overrides)

    def train(self, run: dict) -> dict:
        run_dir = self.work / "runs" / run["id"]
        result = run_dir / "result.json"
        seconds = self._run_once(f"train_{run['id']}", self.train_argv(run), result)
        curve = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        val = [(r["step"], r["val/loss"], r.get("val/expected_tau")) for r in curve if "val/loss" in r]
        tokens_per_s = [r["tokens_per_s"] for r in curve if "tokens_per_s" in r]
        return {"seconds": seconds, "steps": self.cfg.steps, "val_curve": val,
                "tokens_per_s": sum(tokens_per_s) / max(len(tokens_per_s), 1),
                "steps_per_s": self.cfg.steps / seconds if seconds else None,
                "convergence": convergence(val, self.cfg.steps, self.cfg.convergence_window, self.cfg.convergence_tolerance),
                "best_val_expected_tau": json.loads(result.read_text())["best_val_expected_tau"]}

    # -- 4. eval -------------------------------------------------------------------------------------
    def eval_argv(self, run: dict) -> list[str]:
        c = self.cfg
        sets = ",".join(f"{{name:{s.name},path:{s.path},max_prompts:{s.max_prompts}}}" for s in c.eval_sets)
        run_dir = self.work / "runs" / run["id"]
        return ["eval/eval.py", f"target={c.target}", f"drafter_path={run_dir / 'best'}", f"run_dir={run_dir / 'eval'}",
                f"datasets=[{sets}]", f"max_new_tokens={c.max_new_tokens}", "temperature=1.0", "also_greedy=true",
                "peers=false", f"seed={c.eval_seed}", f"calibration_fraction={c.calibration_fraction}", "serving_loads=[1,4,16]"]

    def evaluate(self, run: dict) -> dict:
        out = self.work / "runs" / run["id"] / "eval" / "results.json"
        seconds = self._run_once(f"eval_{run['id']}", self.eval_argv(run), out)
        res = json.loads(out.read_text())
        keep = ("tau", "turns", "rounds", "conditional_acceptance", "prefix_survival", "accept_length_histogram",
                "draft_acceptance_rate", "speedup", "greedy_identical_to_plain", "greedy_mismatched_prompts")
        sets = {}
        for name, entry in res["datasets"].items():
            sets[name] = {"T1": {k: entry["sampled"][k] for k in keep if k in entry["sampled"]},
                          "T0": {k: entry["greedy"][k] for k in keep if k in entry["greedy"]}}
            cal = entry["sampled"].get("calibration")
            if cal:
                sets[name]["T1"]["calibration"] = slim_calibration(cal)
                sim = entry.get("serving_simulation")
                if sim:
                    sets[name]["T1"]["serving_simulation"] = sim
        ev = {"seconds": seconds, "trainable_parameters": res["drafter"]["trainable_parameters"], "sets": sets}
        pooled = res.get("calibration_pooled")  # one STS fit over every set's calibration prompts
        if pooled:
            ev["calibration_pooled"] = {"sets": pooled["sets"], **slim_calibration(pooled)}
        return ev

    # -- the whole study -------------------------------------------------------------------------------
    def run(self) -> dict:
        from deepspec.evaluation.study_report import write_report

        start = time.perf_counter()
        c = self.cfg
        dev = device_info()
        log.info("study: %d runs on %s (%s), quick=%s", len(self.runs()), dev["device"], dev["precision"], self.quick)
        data = self.build_cache()
        data["eval_sets"] = {s.name: sha256_file(REPO / s.path) for s in c.eval_sets}
        data["train_eval_overlap"] = prompt_overlap(REPO / c.train_source, [(REPO / s.path, s.max_prompts) for s in c.eval_sets])
        records = []
        for run in self.runs():
            path = self.results / "runs" / f"{run['id']}.json"
            kept = self.kept_record(run, path, data)
            if kept is not None:
                records.append(kept)
                log.info("%s: kept (recorded earlier with these settings on this cache)", run["id"])
                continue
            t = time.perf_counter()
            train = self.train(run)
            ev = self.evaluate(run)
            record = {**run, "drafter_config": asdict(c.drafters[run["drafter"]]), "train_argv": self.train_argv(run),
                      "eval_argv": self.eval_argv(run), "data": data, "device": dev, "train": train, "eval": ev,
                      "wall_seconds": time.perf_counter() - t, "quick": self.quick}
            path.write_text(json.dumps(record, indent=1, default=str))
            records.append(record)
            log.info("%s: converged=%s, tau T1 %s", run["id"], train["convergence"]["converged"],
                     {k: round(v["T1"]["tau"], 2) for k, v in ev["sets"].items()})
        study = {"config": asdict(c), "quick": self.quick, "command": self.command, "device": dev, "data": data,
                 "wall_seconds": time.perf_counter() - start, "runs": [r["id"] for r in records]}
        write_report(study, records, self.results)
        return study

    def report_only(self) -> dict:
        """The report from the records in results/runs alone (no cache, no training), in the study's order.
        Runs not recorded yet, or recorded with other training/evaluation arguments than the config's now (a
        changed objective: a rerun trains them again), are listed and left out; the claims that need them read
        inconclusive."""
        from deepspec.evaluation.study_report import write_report

        recorded = {r["id"]: r for r in (json.loads(p.read_text()) for p in (self.results / "runs").glob("*.json"))}
        records, missing = [], []
        for run in self.runs():
            old = recorded.get(run["id"])
            stale = None if old is None else self.differences(run, old)
            if old is None or stale:
                missing.append(run["id"] + (f" (recorded with other {', '.join(stale)})" if stale else ""))
            else:
                records.append(old)
        if missing:  # a study stopped before its last runs (it resumes)
            log.warning("runs not finished (left out of the report): %s", ", ".join(missing))
        if not records:
            raise RuntimeError(f"{self.results / 'runs'} holds no run recorded with this study's settings: nothing to report")
        study = {"config": asdict(self.cfg), "quick": self.quick, "command": self.command, "device": records[0]["device"],
                 "data": records[0]["data"], "runs": [r["id"] for r in records], "missing_runs": missing}
        write_report(study, records, self.results)
        return study

    def differences(self, run: dict, old: dict, data: dict | None = None) -> list[str]:
        """What a recorded run was made with that this study would not make it with: training or evaluation
        arguments (wherever its work folder was), mode, and the cache (when ``data`` is given, ``same_cache``)."""
        old_work = work_folder(old.get("train_argv") or [])
        return [what for what, same in (
            ("training arguments", result_settings(relocated(old.get("train_argv"), old_work))
             == result_settings(relocated(self.train_argv(run), self.work))),
            ("evaluation arguments", relocated(old.get("eval_argv"), old_work) == relocated(self.eval_argv(run), self.work)),
            ("quick mode", old.get("quick") == self.quick),
            ("cache", data is None or same_cache(old.get("data", {}), data))) if not same]

    def kept_record(self, run: dict, path: Path, data: dict) -> dict | None:
        """The run's record from an earlier study, if it was made with the same training and evaluation
        arguments, mode and cache (``same_cache``); else None and the run is done again.
        So a study resumes from its results folder alone, e.g. committed results on a fresh clone whose
        work folder (checkpoints, logs) is gone. The convergence verdict is recomputed under today's rule."""
        if not path.exists():
            return None
        old = json.loads(path.read_text())
        differs = self.differences(run, old, data)
        if differs:
            log.warning("%s: %s was recorded with other %s; running it again", run["id"], path, ", ".join(differs))
            return None
        c = self.cfg
        old["train"]["convergence"] = convergence(old["train"]["val_curve"], c.steps, c.convergence_window, c.convergence_tolerance)
        return old


def work_folder(train_argv: list[str]) -> str | None:
    """The work folder a training command was made under: its run_dir is <work>/runs/<id>."""
    run_dir = next((a.split("=", 1)[1] for a in train_argv if a.startswith("run_dir=")), None)
    return str(Path(run_dir).parent.parent) if run_dir else None


def result_settings(argv: list[str] | None) -> list[str] | None:
    """``argv`` without the arguments that cannot change a run's result: how often it checkpoints (a resumed run
    equals an uninterrupted one)."""
    return None if argv is None else [a for a in argv if not a.startswith("checkpoint.every_steps=")]


def relocated(argv: list[str] | None, work: str | Path | None) -> list[str] | None:
    """``argv`` with its work folder written ``<work>`` where an argument's value starts with it: where the
    checkpoints lived is not a setting, so a run recorded under --work runs/reproduce_long is kept by a
    study working in runs/reproduce."""
    if argv is None or work is None:
        return argv
    prefix = f"{Path(work)}/"

    def one(arg: str) -> str:
        key, eq, value = arg.partition("=")
        return f"{key}=<work>/{value[len(prefix):]}" if eq and value.startswith(prefix) else arg

    return [one(a) for a in argv]


def same_cache(recorded: dict, now: dict) -> bool:
    """Whether a run recorded on cache ``recorded`` was trained on the data of cache ``now`` (the study's
    ``data`` dicts). The same bytes, or the same settings and counts: a rebuild may differ in the last bits
    of the stored activations (float reductions are not bit-reproducible across builds and machines), not
    in its samples. A record from before settings_sha256 was kept falls back to the training source's
    sha256 and the counts (token for token; changing rows, template, length or regeneration changes them)."""
    if recorded.get("manifest_sha256") == now["manifest_sha256"]:
        return True
    settings = ("settings_sha256",) if "settings_sha256" in recorded else ("train_source_sha256",)
    return all(recorded.get(k) == now[k] for k in (*settings, "counts"))


def slim_calibration(cal: dict) -> dict:
    """The parts of an STS fit the study keeps (not the threshold sweeps)."""
    return {"sts_temperatures": cal["sts_temperatures"], "fit_rounds": cal["fit_rounds"], "report_rounds": cal["report_rounds"],
            **{when: {k: cal[when][k] for k in ("ece", "auroc", "brier", "reliability")} for when in ("before", "after")}}


def convergence(val_curve: list, steps: int, window: float, tolerance: float) -> dict:
    """Converged when the best validation loss within the last ``window`` of the steps is less than
    ``tolerance`` (relative) below the best before it. ``val_curve``: [(step, loss, expected_tau), ...]."""
    cut = steps * (1 - window)
    before = [loss for step, loss, _ in val_curve if step <= cut]
    after = [loss for step, loss, _ in val_curve if step > cut]
    if not before or not after:
        return {"converged": False, "relative_improvement": None, "rule": "too few validation points"}
    gain = (min(before) - min(after)) / abs(min(before))
    return {"converged": gain < tolerance, "relative_improvement": gain, "best_before": min(before), "best_after": min(after),
            "rule": f"best val loss of the last {window:.0%} of steps improves < {tolerance:.0%} on the best before"}


def prompt_overlap(train_source: Path, eval_sets: list[tuple[Path, int]]) -> dict:
    """Held-out prompts must not be training prompts: per set, how many of the first ``max_prompts`` rows
    (the ones evaluated) have a first turn found in the training source. ``eval_sets``: [(path, max_prompts)]."""
    def first_turns(path: Path, limit: int | None = None) -> set[str]:
        out = set()
        for line in path.read_text().splitlines()[:limit]:
            if line.strip():
                row = json.loads(line)
                turns = row.get("turns") or [m.get("content", "") for m in row.get("conversations", []) if m.get("role") == "user"]
                if not turns and "text" in row:
                    turns = [row["text"]]
                out.add((turns or [""])[0].strip())
        return out

    train = first_turns(train_source)
    return {p.name: len(first_turns(p, n) & train) for p, n in eval_sets}
