"""The study's report: a verdict per claim of the paper, with the numbers behind it, tables and plots.

Inputs are the per-run records ``study.Study`` writes (``results_dir/runs/*.json``); nothing here runs a
model, so the report can be rebuilt from committed files (``scripts/reproduce.py --report-only``).

Verdict rules (stated in the report too). "Spread" is the range over training seeds.
  reproduced      the effect has the paper's sign on every seed, and is larger than the seed spread
  not reproduced  the effect has the opposite sign on every seed (or on the mean, beyond the spread)
  inconclusive    anything else (the effect is within the spread, or runs are missing)
"""
from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

PAPER = {
    1: "Table 1 (Qwen3-4B/8B/14B, gamma 7, T=1): DSpark's macro tau is 1.16-1.18x DFlash's and 1.27-1.31x Eagle3's.",
    2: "The gain over DFlash grows with the block size: +16% at gamma 7, +30% at gamma 15 (math).",
    3: "Fig. 4: parallel drafting (DFlash) loses acceptance along the block; the Markov head keeps late positions accepted.",
    4: "Fig. 6: ECE 3-8% before Sequential Temperature Scaling, about 1% after; AUROC 0.81-0.91; the confidence scheduler "
       "(Algorithm 1) raises throughput over fixed-length verification.",
    5: "Fig. 8: vanilla, gated and RNN Markov heads; each improves on the head-less parallel drafter; the vanilla head is the default.",
}


# -- aggregation ------------------------------------------------------------------------------------
def macro(record: dict, temp: str, key: str = "tau"):
    """Mean over the held-out sets of a per-set figure (a number, or a per-position list)."""
    vals = [s[temp][key] for s in record["eval"]["sets"].values()]
    if isinstance(vals[0], list):
        return [mean(v[k] for v in vals) for k in range(len(vals[0]))]
    return mean(vals)


def pooled_conditional(record: dict, temp: str, min_rounds: int = 20) -> list[float]:
    """P(position k accepted | 1..k-1 accepted), pooled over the held-out sets' rounds (from their acceptance-length
    histograms); NaN where fewer than ``min_rounds`` rounds reached position k (too few to say)."""
    g = record["block_size"]
    counts = [0] * (g + 1)  # rounds with m = i drafts accepted
    for s in record["eval"]["sets"].values():
        for length, c in s[temp]["accept_length_histogram"].items():
            counts[int(length) - 1] += c
    reach = [sum(counts[k:]) for k in range(g + 1)]  # rounds with m >= k
    return [reach[k] / reach[k - 1] if reach[k - 1] >= min_rounds else float("nan") for k in range(1, g + 1)]


def nanmean(vals) -> float:
    vals = [v for v in vals if v == v]
    return mean(vals) if vals else float("nan")


def select(records: list[dict], drafter: str, block: int) -> dict[int, dict]:
    """seed -> record of one drafter at one block size."""
    return {r["seed"]: r for r in records if r["drafter"] == drafter and r["block_size"] == block}


def paired_ratios(a: dict[int, dict], b: dict[int, dict], temp: str) -> list[float]:
    """tau(a) / tau(b) for every seed both have."""
    return [macro(a[s], temp) / macro(b[s], temp) for s in sorted(set(a) & set(b))]


def verdict_from_ratios(ratios: list[float], a_vals: list[float], b_vals: list[float]) -> str:
    """A > B claimed. ratios paired by seed; a_vals/b_vals: A's and B's figures over seeds."""
    if not ratios:
        return "inconclusive"
    if all(r > 1 for r in ratios) and min(a_vals) > max(b_vals):
        return "reproduced"
    if all(r < 1 for r in ratios) and max(a_vals) < min(b_vals):
        return "not reproduced"
    return "inconclusive"


def spread(vals: list[float]) -> str:
    if not vals:  # a study stopped before this drafter's runs finished
        return "n/a (no finished run)"
    return f"{mean(vals):.3f}" + (f" ({min(vals):.3f}-{max(vals):.3f}, {len(vals)} seeds)" if len(vals) > 1 else " (1 seed)")


def per_seed(ratios: list[float]) -> str:
    return ", ".join(f"{x:.3f}" for x in ratios) or "n/a"


# -- the five claims ---------------------------------------------------------------------------------
def claims(records: list[dict], cfg: dict) -> list[dict]:
    g0 = cfg["experiments"]["headline"]["block_sizes"][0]
    sp, fl, ea = (select(records, d, g0) for d in ("dspark", "dflash", "eagle3"))
    out = []

    # 1. DSpark > DFlash, Eagle3 at gamma g0: at equal budget, and (when the study has it) the paper's own design
    out.append(claim_one(sp, {"DFlash": fl, "Eagle3": ea},
                         f"At equal budget DSpark's acceptance length beats DFlash's and Eagle3's (gamma {g0})",
                         seeds=cfg["experiments"]["headline"].get("seeds", [])))
    paper = cfg["experiments"].get("paper_ratio")
    if paper:
        g = paper["block_sizes"][0]
        ours, base = (select(records, d, g) for d in paper["drafters"][:2])
        entry = claim_one(ours, {"Eagle3": base}, f"At the reference's layer counts and parameter ratio ({paper['param_ratio']:.2f}x), "
                          f"DSpark's acceptance length beats Eagle3's (gamma {g})", comparison="paper_ratio",
                          seeds=paper.get("seeds", []))
        entry["evidence"].insert(0, f"{paper['drafters'][0]} vs {paper['drafters'][1]}: trainable parameters "
                                    f"{param_summary(ours)} vs {param_summary(base)}")
        out.append(entry)

    # 2. the gain over DFlash grows with the block size
    blocks = cfg["experiments"].get("block_size", {}).get("block_sizes", [])
    rows, verdicts = [], []
    for g in blocks:
        r_big = paired_ratios(select(records, "dspark", g), select(records, "dflash", g), "T1")
        r_small = paired_ratios(sp, fl, "T1")
        noise = (max(r_small) - min(r_small)) if len(r_small) > 1 else 0.0
        if not r_big or not r_small:
            v = "inconclusive"
        else:
            delta = mean(r_big) - mean(r_small)
            v = "reproduced" if delta > noise and mean(r_big) > 1 else "not reproduced" if delta < -noise else "inconclusive"
        rows.append(f"DSpark / DFlash tau at T=1: gamma {g0} {per_seed(r_small)}; gamma {g} "
                    f"{per_seed(r_big)} (seed spread at gamma {g0}: {noise:.3f}) -> {v}")
        verdicts.append(v)
    out.append({"claim": 2, "title": "The gain over DFlash grows with the block size", "verdict": combine(verdicts), "evidence": rows})

    # 3. suffix decay: late-position conditional acceptance, pooled over the sets' rounds
    rows = []
    late = lambda rec: nanmean(pooled_conditional(rec, "T1")[g0 // 2:])
    first = lambda rec: pooled_conditional(rec, "T1")[0]
    a, b = [late(x) for x in sp.values()], [late(x) for x in fl.values()]
    if any(x != x for x in a + b):
        v = "inconclusive"
        rows.append(f"too few rounds reach positions {g0 // 2 + 1}-{g0} (< 20 per run) to compare them")
    else:
        gaps = [late(sp[s]) - late(fl[s]) for s in sorted(set(sp) & set(fl))]
        v = verdict_from_ratios([1 + x for x in gaps], a, b)
        rows.append(f"conditional acceptance at positions {g0 // 2 + 1}-{g0} (T=1, pooled rounds): DSpark {spread(a)}, DFlash {spread(b)} -> {v}")
        rows.append(f"late / first-position acceptance (1 = no decay): DSpark {spread([late(x) / first(x) for x in sp.values()])}, "
                    f"DFlash {spread([late(x) / first(x) for x in fl.values()])}")
    out.append({"claim": 3, "title": "The Markov head cures the suffix decay of parallel drafting", "verdict": v, "evidence": rows})

    # 4. calibration after STS, and the scheduler using it
    rows = []
    per_set = [s["T1"]["calibration"] for rec in sp.values() for s in rec["eval"]["sets"].values() if "calibration" in s["T1"]]
    pooled = [rec["eval"]["calibration_pooled"] for rec in sp.values() if "calibration_pooled" in rec["eval"]]
    v = "inconclusive"
    for fits, how in ((per_set, "STS fitted per set on that set's calibration prompts"),
                      (pooled if len(pooled) == len(sp) else [], "one STS fit on every set's calibration prompts together")):
        if not fits:
            continue
        ece_b, ece_a, auroc = calibration_summary(fits)
        ok = ece_a <= 0.03 and ece_a < ece_b and auroc >= 0.75
        bad = ece_a >= ece_b or auroc < 0.6
        v = "reproduced" if ok else "not reproduced" if bad else "inconclusive"  # the pooled fit, when recorded, decides
        rounds = f"{min(c['fit_rounds'] for c in fits)}-{max(c['fit_rounds'] for c in fits)} fit rounds per fit"
        rows.append(f"DSpark, T=1, held-out rounds, {how} ({rounds}): mean per-position ECE {ece_b:.3f} before STS -> "
                    f"{ece_a:.3f} after; mean AUROC {auroc:.3f} -> {v}")
    rows.append("rule: reproduced when ECE after <= 0.03 and below before, and AUROC >= 0.75; not reproduced when STS does not "
                "lower ECE or AUROC < 0.6; the pooled fit decides when every seed has one" if rows else "no DSpark calibration recorded")
    gains = [ld["confidence"]["throughput_tokens_per_s"] / ld["fixed"]["throughput_tokens_per_s"]
             for rec in sp.values() for s in rec["eval"]["sets"].values()
             for ld in s["T1"].get("serving_simulation", {}).get("loads", [])]
    if gains:
        rows.append(f"Algorithm 1 vs fixed-length verification, simulated serving throughput over sets and loads: "
                    f"{min(gains):.2f}-{max(gains):.2f}x (mean {mean(gains):.2f}x)")
    out.append({"claim": 4, "title": "STS-calibrated confidences are reliable and the scheduler uses them", "verdict": v, "evidence": rows})

    # 5. head ablation
    rows, verdicts = [], []
    base = [macro(x, "T1") for x in fl.values()]
    for name in ("dspark", "dspark_gated", "dspark_rnn"):
        head = select(records, name, g0)
        vals = [macro(x, "T1") for x in head.values()]
        if not vals or not base:
            verdicts.append("inconclusive")
            rows.append(f"{name}: tau T=1 {spread(vals)} vs DFlash {spread(base)} -> inconclusive")
            continue
        v = verdict_from_ratios(paired_ratios(head, fl, "T1") or [mean(vals) / mean(base)], vals, base)
        verdicts.append(v)
        rows.append(f"{name} ({records_head(head)}): tau T=1 {spread(vals)} vs DFlash {spread(base)} -> {v}")
    out.append({"claim": 5, "title": "Every Markov head (vanilla, gated, RNN) beats the head-less parallel drafter",
                "verdict": combine(verdicts), "evidence": rows})
    for c in out:
        c["paper"] = PAPER[c["claim"]]
    return out


def claim_one(ours: dict[int, dict], baselines: dict[str, dict[int, dict]], title: str, comparison: str = "equal_budget",
              seeds: list[int] = ()) -> dict:
    """Claim 1 for one design of the comparison: DSpark (``ours``, seed -> record) against each baseline, at T=1
    and T=0; the T=1 comparisons decide (Table 1 is at T=1). ``seeds``: the seeds the study plans; while one of
    them is unfinished on either side the comparison is inconclusive ("on every seed" cannot be judged yet)."""
    rows, verdicts = [], []
    for name, base in baselines.items():
        unfinished = sorted(set(seeds) - (set(ours) & set(base)))
        for temp in ("T1", "T0"):
            r = paired_ratios(ours, base, temp)
            a, b = [macro(x, temp) for x in ours.values()], [macro(x, temp) for x in base.values()]
            v = "inconclusive" if unfinished else verdict_from_ratios(r, a, b)
            waiting = f" (seed {', '.join(map(str, unfinished))} not finished on both sides)" if unfinished and r else ""
            rows.append(f"DSpark / {name} at {temp[0]}={temp[1]}: tau {spread(a)} vs {spread(b)}, ratio per seed "
                        f"{per_seed(r)}{waiting} -> {v}")
            if temp == "T1":
                verdicts.append(v)
    rows.append("rule: the T=1 comparisons decide (Table 1 is at T=1): reproduced when DSpark's macro tau is above the "
                "baseline's on every seed and its range above the baseline's; T=0 is reported beside it")
    return {"claim": 1, "comparison": comparison, "title": title, "verdict": combine(verdicts), "evidence": rows}


def param_summary(runs: dict[int, dict]) -> str:
    counts = sorted({r["eval"]["trainable_parameters"] for r in runs.values()})
    return "/".join(f"{c / 1e6:.2f}M" for c in counts) or "n/a (no finished run)"


def calibration_summary(fits: list[dict]) -> tuple[float, float, float]:
    """Mean per-position ECE before and after STS, and mean AUROC after, over STS fits (per set or pooled)."""
    aurocs = [x for c in fits for x in c["after"]["auroc"] if x == x]  # NaN: one class only at that position
    return (mean(mean(c["before"]["ece"]) for c in fits), mean(mean(c["after"]["ece"]) for c in fits),
            mean(aurocs) if aurocs else float("nan"))


def records_head(head: dict[int, dict]) -> str:
    rec = next(iter(head.values()))
    return rec["drafter_config"]["fields"].get("markov_head_type", "vanilla") + " head"


def combine(verdicts: list[str]) -> str:
    """A claim made of several comparisons ("beats DFlash and Eagle3", "every head"): it holds when every
    comparison reproduces, fails when any comparison goes the other way, else is inconclusive."""
    if verdicts and all(v == "reproduced" for v in verdicts):
        return "reproduced"
    return "not reproduced" if "not reproduced" in verdicts else "inconclusive"


# -- files ---------------------------------------------------------------------------------------------
def runs_by(records: list[dict], value, default: str) -> dict[str, list[str]]:
    """{value(record) (``default`` where a record lacks it): [run ids]}, in record order."""
    out: dict[str, list[str]] = {}
    for r in records:
        try:
            key = value(r)
        except KeyError:
            key = default
        out.setdefault(key, []).append(r["id"])
    return out or {default: []}


def cache_builds(data: dict, records: list[dict]) -> str:
    """The cache's manifest sha256, or, when the runs were trained on several builds of it (a study resumed
    on a rebuilt cache with the same settings and counts, see study.same_cache), which runs used which."""
    builds = runs_by(records, lambda r: r["data"]["manifest_sha256"], data["manifest_sha256"])
    if len(builds) == 1:
        return f"manifest sha256 `{next(iter(builds))[:12]}`"
    return (f"{len(builds)} builds of the cache with the same settings and counts, so the same samples: manifest sha256 "
            + "; ".join(f"`{sha[:12]}` ({', '.join(ids)})" for sha, ids in builds.items()))


def machines(device: dict, records: list[dict]) -> str:
    """The machine (and training precision, where recorded) the runs ran on, or which runs ran on which (a study
    resumed on another machine: precision ``auto`` picks bf16 on one CPU and fp32 on another)."""
    def label(dev: dict) -> str:
        return dev["device"] + (f", {dev['precision']} training" if dev.get("precision") else "")

    found = runs_by(records, lambda r: label(r["device"]), label(device))
    if len(found) == 1:
        return next(iter(found))
    return " and ".join(f"{name} ({', '.join(ids)})" for name, ids in found.items())


def write_report(study: dict, records: list[dict], results_dir: str | Path) -> Path:
    results_dir = Path(results_dir)
    cfg = study["config"]
    found = claims(records, cfg)
    (results_dir / "study.json").write_text(json.dumps({**study, "claims": found}, indent=1, default=str))
    plots = write_plots(records, cfg, results_dir)
    dev, data = study["device"], study["data"]
    sets = ", ".join(f"`{s['name']}` ({s['max_prompts']} prompts)" for s in cfg["eval_sets"])
    lines = [
        "# Reproducing the DSpark paper's claims at small scale",
        "",
        f"Generated by `{study.get('command') or 'python scripts/reproduce.py' + ' --quick' * study['quick']}` "
        f"({total_minutes(study, records):.0f} min of compute on {machines(dev, records)}; {dev['threads']} threads, "
        f"torch {dev['torch']}). Target `{cfg['target']}`; {data['counts']['samples']} cached samples "
        f"({data['counts']['loss_tokens']} supervised tokens) of the target's own answers to `{cfg['train_source']}` "
        f"({cache_builds(data, records)}); every drafter trained {cfg['steps']} steps x "
        f"{cfg['global_batch_size']} samples at lr {cfg['lr']}; real speculative decoding on "
        f"{sets}, {cfg['max_new_tokens']} new tokens "
        f"per turn. Training prompts found in the held-out sets: {sum(data['train_eval_overlap'].values())}.",
        "",
        *([f"**Runs not finished, left out (their claims read inconclusive where they were needed): "
           f"{', '.join(study['missing_runs'])}.**", ""] if study.get("missing_runs") else []),
        "## Verdicts",
        "",
        "Rules: *reproduced* = the paper's sign on every seed and beyond the seed spread; *not reproduced* = the opposite "
        "sign beyond the spread; *inconclusive* = within the spread. tau counts the bonus token; macro = mean over the held-out sets.",
        "",
    ]
    for c in found:
        design = " (the paper's comparison)" if c.get("comparison") == "paper_ratio" else ""
        lines += [f"### Claim {c['claim']}{design}: {c['title']}: **{c['verdict']}**", "", f"Paper: {c['paper']}", ""]
        lines += [f"- {e}" for e in c["evidence"]] + [""]
    lines += ["## Acceptance length by run (macro over held-out sets)", "",
              "| run | trainable params | converged (val loss gain in last window) | tau T=1 | tau T=0 | greedy == plain | " +
              " | ".join(s["name"] for s in cfg["eval_sets"]) + " (T=1) |",
              "|---|---|---|---|---|---|" + "---|" * len(cfg["eval_sets"])]
    for r in sorted(records, key=lambda r: (r["block_size"], r["drafter"], r["seed"])):
        conv = r["train"]["convergence"]
        gain = conv.get("relative_improvement")
        identical = all(s["T0"].get("greedy_identical_to_plain", False) for s in r["eval"]["sets"].values())
        lines.append(f"| {r['id']} | {r['eval']['trainable_parameters'] / 1e6:.2f}M | {'yes' if conv['converged'] else 'no'} "
                     f"({'n/a' if gain is None else f'{gain:+.1%}'}) | {macro(r, 'T1'):.3f} | {macro(r, 'T0'):.3f} | "
                     f"{'yes' if identical else 'NO'} | " +
                     " | ".join(f"{r['eval']['sets'][s['name']]['T1']['tau']:.2f}" for s in cfg["eval_sets"]) + " |")
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    notes = results_dir / "NOTES.md"
    if notes.exists():  # hand-written discussion (explanations of what did not reproduce), kept across regenerations
        lines += ["", notes.read_text().strip()]
    lines += ["", "Per-run files: `runs/<drafter>_g<gamma>_s<seed>.json` (config, seeds, data hashes, device, wall time, "
              "validation curve, per-set results); `study.json` (the claims as data)."]
    if (results_dir / "benchmarks").is_dir():
        lines += ["", "Also in this folder: [benchmarks/](benchmarks/README.md) (decoding, serving and training speed, "
                  "precision) and `mutations.json` (the mutation check of the core math)."]
    out = results_dir / "README.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def total_minutes(study: dict, records: list[dict]) -> float:
    """The study's compute time: the cache build plus every run's training and evaluation (a resumed study
    counts each part once, when it ran)."""
    return ((study["data"].get("build_seconds") or 0) + sum(r.get("wall_seconds") or 0 for r in records)) / 60


def write_plots(records: list[dict], cfg: dict, results_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    blocks = sorted({r["block_size"] for r in records})
    fig, axes = plt.subplots(1, len(blocks), figsize=(5.5 * len(blocks), 4), squeeze=False)
    for ax, g in zip(axes[0], blocks):
        for name in sorted({r["drafter"] for r in records if r["block_size"] == g}):
            runs = select(records, name, g)
            curves = [pooled_conditional(x, "T1") for x in runs.values()]
            avg = [nanmean(c[k] for c in curves) for k in range(len(curves[0]))]
            ax.plot(range(1, len(avg) + 1), avg, "-o", ms=3, label=f"{name} ({len(curves)} seed{'s' * (len(curves) > 1)})")
        ax.set(xlabel="draft position k", ylabel="P(k accepted | 1..k-1 accepted)", title=f"gamma {g}, T=1, rounds pooled over sets", ylim=(0, 1))
        ax.legend(fontsize=7)
    paths.append(_save(fig, results_dir / "acceptance_by_position.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    ids = sorted({(r["block_size"], r["drafter"]) for r in records})
    for i, (g, name) in enumerate(ids):
        for j, temp in enumerate(("T1", "T0")):
            vals = [macro(x, temp) for x in select(records, name, g).values()]
            ax.bar(i + 0.4 * j, mean(vals), 0.4, yerr=[[mean(vals) - min(vals)], [max(vals) - mean(vals)]],
                   color=("C0", "C1")[j], label=("T=1", "T=0")[j] if i == 0 else None)
    ax.set_xticks([i + 0.2 for i in range(len(ids))], [f"{n}\ng{g}" for g, n in ids], fontsize=7)
    ax.set(ylabel="tau (macro, bars = seed range)", title="Acceptance length by drafter and gamma")
    ax.legend()
    paths.append(_save(fig, results_dir / "tau_by_drafter.png"))

    g0 = cfg["experiments"]["headline"]["block_sizes"][0]
    sp = select(records, "dspark", g0)
    cal = ([rec["eval"]["calibration_pooled"] for rec in sp.values() if "calibration_pooled" in rec["eval"]] or
           [s["T1"]["calibration"] for rec in sp.values() for s in rec["eval"]["sets"].values() if "calibration" in s["T1"]])
    if cal:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for when, style in (("before", "-o"), ("after", "-s")):
            bins: dict[int, list] = {}
            for c in cal:
                for pos in c[when]["reliability"]:
                    for b in pos:
                        bins.setdefault(b["bin"], []).append(b)
            xs = [sum(b["predicted"] * b["count"] for b in v) / sum(b["count"] for b in v) for _, v in sorted(bins.items())]
            ys = [sum(b["observed"] * b["count"] for b in v) / sum(b["count"] for b in v) for _, v in sorted(bins.items())]
            axes[0].plot(xs, ys, style, ms=3, label=f"{when} STS")
            g = len(cal[0][when]["ece"])
            axes[1].plot(range(1, g + 1), [mean(c[when]["ece"][k] for c in cal) for k in range(g)], style, ms=3, label=f"{when} STS")
        axes[0].plot([0, 1], [0, 1], ":", color="grey")
        axes[0].set(xlabel="predicted survival prod c_i", ylabel="observed survival", title="DSpark reliability (all positions, held-out rounds)")
        axes[1].set(xlabel="draft position k", ylabel="ECE (20 bins)", title="DSpark per-position ECE")
        for ax in axes:
            ax.legend()
        paths.append(_save(fig, results_dir / "calibration.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in sorted(records, key=lambda r: r["id"]):
        curve = r["train"]["val_curve"]
        ax.plot([c[0] for c in curve], [c[1] for c in curve], label=r["id"], lw=1)
    ax.set(xlabel="optimizer step", ylabel="validation loss (each drafter's own loss)", title="Convergence")
    ax.legend(fontsize=6, ncol=2)
    paths.append(_save(fig, results_dir / "validation_loss.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
