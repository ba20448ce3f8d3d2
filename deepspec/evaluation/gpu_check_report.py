"""The short markdown page of a ``scripts/gpu_check.py`` result (its JSON, as a dict): one table per section."""
from __future__ import annotations


def _f(x, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "inf" if x == float("inf") else f"{x:.{digits}f}"
    return str(x)


def _section_head(name: str, section: dict) -> list[str]:
    head = [f"## {name} ({section['status']}, {section['seconds']:.0f} s)", ""]
    if section["status"] == "error":
        head += [f"`{section['error']}`", ""]
    if section["status"] == "skipped":
        head += [section["reason"], ""]
    return head


def cuda_tests_lines(s: dict) -> list[str]:
    lines = [f"pytest tests/gpu, Triton interpreter off: {s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped."]
    lines += [f"- failed: `{t}`" for t in s["failed_tests"]]
    lines += [f"- skipped because: {r}" for r in s["skip_reasons"]]
    return lines


def decoding_lines(s: dict) -> list[str]:
    vc = s["verify_cost"]
    shown = [w for w in vc["widths"] if w in (1, 2, 4, 8, 12, 16) or w == vc["widths"][-1]]
    lines = [f"Target {s['target_parameters'] / 1e9:.2f}B parameters ({s['dtype']}), drafter {s['drafter_parameters'] / 1e6:.4g}M "
             "parameters besides the target's embedding and LM head, random weights.", "",
             f"Verify cost t(rows, width) / t(1, 1) after {vc['context_tokens']} tokens of context (t(1, 1) = {vc['t11_ms']:.2f} ms):", "",
             "| rows \\ width | " + " | ".join(map(str, shown)) + " |", "|---" * (len(shown) + 1) + "|"]
    for R, line in zip(vc["rows"], vc["ratio"]):
        lines.append(f"| {R} | " + " | ".join(_f(line[vc['widths'].index(w)]) for w in shown) + " |")
    lines += ["", "| context | step ms | verify(g+1) ms | draft ms | draft in target steps | implied speedup tau 2 / 3 / 5 |",
              "|---|---|---|---|---|---|"]
    for ctx, c in s["by_context"].items():
        imp = s["implied_speedup"][ctx]
        lines.append(f"| {ctx} | {_f(c['step_ms'])} | {_f(c['verify_ms'])} | {_f(c['draft_ms'])} | {_f(c['draft_in_target_steps'])} | "
                     + " / ".join(_f(v) for v in imp.values()) + " |")
    red = s["reduced_vocab"]
    lines += ["", f"With a {red['draft_vocab']:,}-token draft vocabulary: draft in target steps "
              + ", ".join(f"{_f(c['draft_in_target_steps'])} at {ctx}" for ctx, c in red["by_context"].items())
              + "; implied speedup at tau 2 / 3 / 5 "
              + ", ".join(" / ".join(_f(v) for v in imp.values()) + f" at {ctx}" for ctx, imp in red["implied_speedup"].items()) + "."]
    lines += ["", "| T | tau (random drafter) | round ms | draft / verify / overhead share |", "|---|---|---|---|"]
    for T, r in s["loop"].items():
        lines.append(f"| {T[1:]} | {_f(r['tau'])} | {_f(r['round_ms'])} | {_f(r['draft_share'])} / {_f(r['verify_share'])} / "
                     f"{_f(r['overhead_share'])} |")
    k = s["kernels"]
    lines += ["", f"Fused steps ({'Triton' if k['triton'] else 'PyTorch reference'}): Markov walk {_f(k['markov_walk_ms'], 3)} ms, "
              f"sampled verify {_f(k['verify_ms'], 3)} ms, greedy verify {_f(k['verify_greedy_ms'], 3)} ms: "
              f"{100 * k['share_of_round_T1']:.1f}% of a T=1 round. Implied speedups are what the measured costs give a "
              "drafter of that tau at batch 1, not measurements."]
    return lines


def training_lines(s: dict) -> list[str]:
    lines = ["| vocabulary | trainable | tokens/s | s/step | peak GiB | TFLOP/s | MFU |", "|---|---|---|---|---|---|---|"]
    for name in ("full_vocab", "reduced_vocab"):
        r = s[name]
        if r["status"] != "ok":
            lines.append(f"| {name} | error: `{r['error'][:200]}` | | | | | |")
            continue
        lines.append(f"| {r['draft_vocab']:,} | {r['trainable_parameters'] / 1e6:.4g}M | {r['tokens_per_s']:,.0f} | {_f(r['step_s'], 3)} | "
                     f"{_f(r['peak_gib'])} | {_f(r['achieved_tflops'], 1)} | {_f(r['mfu'], 3)} |")
    r = s["full_vocab"] if s["full_vocab"]["status"] == "ok" else s["reduced_vocab"]
    lines += ["", f"One sample of {r.get('seq_tokens')} tokens, {r.get('anchors')} anchors per step, DeepSpeed ZeRO-2; FLOPs counted by "
              "torch per executed op (the loss's recomputed logits included: hardware FLOPs)."]
    return lines


def memory_lines(s: dict) -> list[str]:
    c = s["loss_chunking"]
    unchunked = "out of memory" if c["unchunked_peak_gib"] == float("inf") else f"{_f(c['unchunked_peak_gib'])} GiB"
    lines = [f"Loss chunking at {c['seq_tokens']} tokens, {c['anchors']} anchors: peak {_f(c['chunked_peak_gib'])} GiB chunked "
             f"vs {unchunked} unchunked (saves {_f(c['saved_gib'])} GiB).", "",
             "| seq tokens | peak GiB at micro 1 / 2 | largest micro-batch | confirmed |", "|---|---|---|---|"]
    for m in s["micro_batch"]:
        capped = " (the cap)" if m.get("capped") else ""
        lines.append(f"| {m['seq_tokens']} | {_f(m['peak_gib_micro_1'])} / {_f(m['peak_gib_micro_2'])} | "
                     f"{_f(m['largest_micro_batch'])}{capped} | {_f(m['confirmed'])} |")
    return lines


def summary(result: dict) -> str:
    """The markdown summary of one result."""
    dev = result["device"]
    out = [f"# gpu_check: {dev['name']}{' (dry run, tiny shapes)' if result['dry_run'] else ''}", "",
           f"Commit `{result['commit']}`, {result['date']}, torch {result['torch']}, {result['seconds']:.0f} s in all, shape "
           f"`{result['shape']['name']}`. Rerun: `scripts/gpu_check.sh{' --dry-run' if result['dry_run'] else ''}`.", ""]
    render = {"cuda_tests": cuda_tests_lines, "decoding": decoding_lines, "training": training_lines, "memory": memory_lines}
    for name, section in result["sections"].items():
        out += _section_head(name, section)
        if section["status"] in ("ok", "failed") or name == "training" and section.get("full_vocab"):
            out += render[name](section) + [""]
    return "\n".join(out)
