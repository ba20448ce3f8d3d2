"""Write an eval run folder: results.json and a markdown summary table."""
from __future__ import annotations

import json
from pathlib import Path


def _row(name: str, mode: str, r: dict) -> str:
    split = r["speculative"]["time_split"]
    total = sum(split.values()) or 1.0
    return (f"| {name} | {mode} | {r['tau']:.2f} | {r['speedup']:.2f}x | {r['speculative']['tokens_per_s']:.1f} | "
            f"{r['plain']['tokens_per_s']:.1f} | {' / '.join(f'{v:.2f}' for v in r['conditional_acceptance'])} | "
            f"{100 * split['draft'] / total:.0f}/{100 * split['verify'] / total:.0f}/{100 * split['other'] / total:.0f} |")


def plain_words(results: dict) -> str:
    """The report's opening for a newcomer: what ran, how much faster (or slower) and why, what next."""
    cfg, name = results["config"], next(iter(results["datasets"]))
    r = results["datasets"][name]["sampled"]
    d = results.get("drafter", {})
    kind = d.get("kind", "speculative")
    layers = d.get("num_hidden_layers")
    shape = (f" ({layers} layer{'s' if layers != 1 else ''}, {d['trainable_parameters'] / 1e6:.1f}M parameters of its own)"
             if layers else "")
    plain_step = 1.0 / max(r["plain"]["tokens_per_s"], 1e-9)  # seconds per token of plain decoding
    round_s = r["tau"] / max(r["speculative"]["tokens_per_s"], 1e-9)  # seconds per speculative round
    split = r["speculative"]["time_split"]
    total = sum(split.values()) or 1.0
    draft_steps, verify_steps = (round_s * split[k] / total / plain_step for k in ("draft", "verify"))
    faster = r["speedup"] >= 1.0
    out = [
        f"A {kind} drafter{shape} from `{cfg['drafter_path']}` proposed up to {d.get('block', '?')} tokens at a time for "
        f"the target `{cfg['target']['name_or_path']}` on {results['device']}, over {r['turns']} prompts of `{name}` "
        f"(sampling at temperature {cfg['temperature']}).",
        f"With it the target answered at {r['speculative']['tokens_per_s']:.0f} tokens/s against {r['plain']['tokens_per_s']:.0f} "
        f"without it: **{r['speedup']:.2f}x {'faster than' if faster else 'the speed of'} plain decoding**, with exactly the same output "
        f"distribution (greedy output is checked token for token).",
        f"Why: each round the target kept {r['tau']:.2f} tokens on average (the acceptance length), and a round cost "
        f"{draft_steps:.2f} plain decoding steps of drafting plus {verify_steps:.2f} of verification, so the ideal is about "
        f"{r['tau']:.2f} / {draft_steps + verify_steps:.2f} = {r['tau'] / max(draft_steps + verify_steps, 1e-9):.2f}x.",
    ]
    src = r.get("token_sources", {})
    if src.get("lookup"):  # a lookup policy ran: say which proposer emitted what
        out.append(f"Of the tokens emitted, {100 * src['lookup']:.0f}% were the lookup's proposals (n-gram matches in the "
                   f"prompt and answer so far), {100 * src['drafter']:.0f}% the drafter's and {100 * src['target']:.0f}% the "
                   f"target's own (plain steps, corrections and bonus tokens); the engine chose per round by predicted "
                   f"tokens per second (`schedule.policy={cfg['schedule']['policy']}`).")
    if results["device"].startswith("cpu"):
        out.append("On a CPU with a tiny target the draft costs about as much as a target step, so this is a correctness "
                   "run more than a speed one; on a GPU with a real target (e.g. `target=qwen3_8b`) a draft is a small "
                   "fraction of a target step and the speedup approaches the acceptance length. Longer training "
                   "(`STEPS`, `ROWS`) raises the acceptance length.")
    else:
        out.append("To raise the acceptance length, train longer on more of the target's own answers; "
                   "`schedule.policy=scheduled_with_draft_cost` lets the engine verify only what is likely to survive.")
    return " ".join(out)


def write_report(results: dict, run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    lines = ["# deepspec eval", "", plain_words(results), "", f"device: {results['device']}", "",
             "| dataset | decoding | tau | speedup | spec tok/s | plain tok/s | conditional acceptance by position | draft/verify/other % |",
             "|---|---|---|---|---|---|---|---|"]
    for name, entry in results["datasets"].items():
        for mode in ("sampled", "greedy"):
            if mode in entry:
                lines.append(_row(name, mode, entry[mode]))
    for name, entry in results["datasets"].items():
        for mode in ("sampled", "greedy"):
            if "greedy_identical_to_plain" in entry.get(mode, {}):
                ok = entry[mode]["greedy_identical_to_plain"]
                lines += ["", f"Greedy speculative output identical to plain greedy decoding on {name}: "
                              f"{'yes, every prompt' if ok else 'NO: prompts ' + str(entry[mode]['greedy_mismatched_prompts'])}"]
        if "peers" in entry:
            lines += ["", f"Peers on {name} (greedy, same prompts): " + ", ".join(
                f"{k} {v['tokens_per_s']:.1f} tok/s" for k, v in entry["peers"].items())]
        cal = entry["sampled"].get("calibration")
        if cal:
            lines += ["", f"Calibration on {name} (cumulative confidence vs prefix acceptance, held-out rounds):",
                      "", "| position | ECE before | ECE after STS | AUROC | Brier before | Brier after |", "|---|---|---|---|---|---|"]
            for k in range(len(cal["before"]["ece"])):
                lines.append(f"| {k + 1} | {cal['before']['ece'][k]:.3f} | {cal['after']['ece'][k]:.3f} | "
                             f"{cal['before']['auroc'][k]:.3f} | {cal['before']['brier'][k]:.3f} | {cal['after']['brier'][k]:.3f} |")
    (run_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return run_dir / "summary.md"


def log_report_to_wandb(results: dict, run_dir: str | Path, wandb_cfg) -> None:
    """The eval stage's W&B run: headline figures as the summary, the report as tables, the plots as images."""
    from deepspec.tracking import start_wandb_run

    run_dir = Path(run_dir)
    run = start_wandb_run(wandb_cfg, "eval", run_dir, results.get("config"))
    if run is None:
        return
    import wandb

    headline, rows, positions = {}, [], []
    for name, entry in results["datasets"].items():
        for mode in ("sampled", "greedy"):
            if mode not in entry:
                continue
            r = entry[mode]
            headline.update({f"{name}/{mode}/tau": r["tau"], f"{name}/{mode}/speedup": r["speedup"],
                             f"{name}/{mode}/spec_tokens_per_s": r["speculative"]["tokens_per_s"],
                             f"{name}/{mode}/plain_tokens_per_s": r["plain"]["tokens_per_s"]})
            rows.append([name, mode, r["tau"], r["speedup"], r["speculative"]["tokens_per_s"], r["plain"]["tokens_per_s"]])
            positions += [[name, mode, k + 1, a] for k, a in enumerate(r["conditional_acceptance"])]
    run.log({"eval/summary": wandb.Table(columns=["dataset", "decoding", "tau", "speedup", "spec_tok_s", "plain_tok_s"], data=rows),
             "eval/acceptance_by_position": wandb.Table(columns=["dataset", "decoding", "position", "conditional_acceptance"],
                                                        data=positions),
             **{f"plots/{p.stem}": wandb.Image(str(p)) for p in sorted(run_dir.glob("*.png"))}})
    run.summary.update(headline)
    run.finish()
