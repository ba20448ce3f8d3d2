"""Acceptance and confidence-calibration metrics, from what the decoding loop records per round.

Per round r the loop records m_r (drafts accepted out of g) and, for DSpark, the confidences
c_{r,1..g}. Position k (1-based) of a round *survives* when m_r >= k.

    tau                 mean(m_r + 1)                       (bonus/correction token included)
    prefix_survival[k]  P(m >= k)                           (what the reference code reports)
    conditional[k]      P(m >= k | m >= k-1)                (the paper's position-wise acceptance)
    a_{r,k}             prod_{i<=k} c_{r,i}                 predicted survival of position k
    ECE (20 bins), AUROC and Brier of a_{.,k} against 1[m >= k], per position
"""
from __future__ import annotations

import torch

from deepspec.calibration import apply_temperatures, cumulative_survival, ece, fit_sequential_temperatures  # noqa: F401 (re-exported)


def acceptance_stats(accepted: list[int], g: int) -> dict:
    m = torch.tensor(accepted, dtype=torch.float32)
    n = max(len(accepted), 1)
    survive = [float((m >= k).sum()) / n for k in range(1, g + 1)]
    cond = [float((m >= k).sum() / max(float((m >= k - 1).sum()), 1.0)) for k in range(1, g + 1)]
    hist = [int((m == i).sum()) for i in range(g + 1)]
    return {"rounds": len(accepted), "tau": float((m + 1).mean()) if accepted else 0.0, "prefix_survival": survive,
            "conditional_acceptance": cond, "accept_length_histogram": {str(i + 1): h for i, h in enumerate(hist)}}


def auroc(pred: torch.Tensor, label: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN for one class."""
    pos, neg = int(label.sum()), int((1 - label).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = torch.argsort(pred)
    ranks = torch.empty_like(pred, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(pred) + 1, dtype=torch.float64)
    for v in torch.unique(pred):  # average ranks of ties
        tie = pred == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return float((ranks[label.bool()].sum() - pos * (pos + 1) / 2) / (pos * neg))


def calibration(conf: torch.Tensor, accepted: torch.Tensor, bins: int = 20) -> dict:
    """conf (R, g) per-position confidences, accepted (R,) m per round -> per-position ECE/AUROC/Brier."""
    R, g = conf.shape
    survival = cumulative_survival(conf)  # a_{r,k}
    out = {"ece": [], "auroc": [], "brier": [], "mean_predicted": [], "mean_observed": [], "reliability": []}
    for k in range(g):
        label = (accepted >= k + 1).double()
        idx = (survival[:, k] * bins).long().clamp(max=bins - 1)
        out["reliability"].append([{"bin": b, "predicted": float(survival[idx == b, k].mean()), "observed": float(label[idx == b].mean()),
                                    "count": int((idx == b).sum())} for b in range(bins) if (idx == b).any()])
        out["ece"].append(ece(survival[:, k], label, bins))
        out["auroc"].append(auroc(survival[:, k], label))
        out["brier"].append(float(((survival[:, k] - label) ** 2).mean()))
        out["mean_predicted"].append(float(survival[:, k].mean()))
        out["mean_observed"].append(float(label.mean()))
    return out


def threshold_sweep(conf: torch.Tensor, accepted: torch.Tensor, thresholds: list[float] | None = None,
                    per_step: bool = False) -> list[dict]:
    """Static threshold: verify the leading drafts whose confidence is >= t.

    ``per_step=False`` thresholds the cumulative survival a_k = prod_{i<=k} c_i (what the scheduler uses);
    ``per_step=True`` thresholds each slot's own c_k (stop at the first slot below t).
    Per threshold: verified drafts per round, acceptance rate (accepted / verified) and tokens per
    target step (min(m, L) + 1), from recorded rounds (conf (R, g), accepted (R,)).
    """
    thresholds = thresholds or [i / 20 for i in range(20)]
    score = conf.double() if per_step else cumulative_survival(conf)
    out = []
    for t in thresholds:
        L = (score >= t).int().cumprod(1).sum(1)  # leading slots at or above the threshold
        got = torch.minimum(accepted, L)
        out.append({"threshold": t, "verified_per_round": float(L.float().mean()),
                    "acceptance_rate": float(got.sum() / L.sum().clamp_min(1)), "tokens_per_step": float((got + 1).float().mean())})
    return out
