"""PNG plots of an eval run: position-wise acceptance, reliability diagrams, threshold sweep, and
throughput against per-request speed for the two verification policies."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(results: dict, run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    out = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, entry in results["datasets"].items():
        for mode, style in (("sampled", "-o"), ("greedy", "--s")):
            if mode in entry:
                r = entry[mode]
                k = range(1, len(r["conditional_acceptance"]) + 1)
                ax.plot(k, r["conditional_acceptance"], style, label=f"{name} {mode} (tau {r['tau']:.2f})")
    ax.set(xlabel="draft position k", ylabel="P(k accepted | 1..k-1 accepted)", ylim=(0, 1.02), title="Position-wise acceptance")
    ax.legend(fontsize=7)
    out.append(_save(fig, run_dir / "acceptance_by_position.png"))

    for name, entry in results["datasets"].items():
        cal = entry["sampled"].get("calibration")
        if not cal:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(9, 4))
        ax = axes[0]
        for key, style in (("before", "-o"), ("after", "-s")):
            for k in (0, len(cal[key]["reliability"]) - 1):  # first and last draft position, 20 bins
                pts = cal[key]["reliability"][k]
                ax.plot([p["predicted"] for p in pts], [p["observed"] for p in pts], style,
                        label=f"pos {k + 1} {key} STS (ECE {cal[key]['ece'][k]:.3f})", alpha=0.8)
        ax.plot([0, 1], [0, 1], ":k", lw=1)
        ax.set(xlabel="predicted survival prod c_i (binned)", ylabel="observed prefix acceptance", title=f"Reliability: {name}")
        ax.legend(fontsize=7)
        ax = axes[1]
        sweep = cal["threshold_sweep"]
        t = [s["threshold"] for s in sweep]
        ax.plot(t, [s["acceptance_rate"] for s in sweep], "-o", label="acceptance rate of verified drafts")
        ax2 = ax.twinx()
        ax2.plot(t, [s["tokens_per_step"] for s in sweep], "-s", color="tab:orange", label="tokens per target step")
        ax.set(xlabel="static threshold on cumulative confidence", ylabel="acceptance rate", title="Threshold sweep")
        ax2.set_ylabel("tokens per step")
        ax.legend(loc="lower left", fontsize=7)
        ax2.legend(loc="lower right", fontsize=7)
        out.append(_save(fig, run_dir / f"calibration_{name}.png"))

        sim = entry.get("serving_simulation")
        if sim:
            fig, ax = plt.subplots(figsize=(6, 4))
            for policy, style in (("fixed", "-o"), ("confidence", "-s")):
                xs = [l[policy]["per_request_tokens_per_s"] for l in sim["loads"]]
                ys = [l[policy]["throughput_tokens_per_s"] for l in sim["loads"]]
                ax.plot(xs, ys, style, label=f"{policy} verification")
                for l, x, y in zip(sim["loads"], xs, ys):
                    ax.annotate(str(l["concurrent_requests"]), (x, y), fontsize=6)
            ax.set(xlabel="per-request tokens/s", ylabel="throughput tokens/s", title=f"Serving simulation: {name} (labels: R)")
            ax.legend(fontsize=7)
            out.append(_save(fig, run_dir / f"serving_{name}.png"))
    return out
