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

import math

import torch


def acceptance_stats(accepted: list[int], g: int) -> dict:
    m = torch.tensor(accepted, dtype=torch.float32)
    n = max(len(accepted), 1)
    survive = [float((m >= k).sum()) / n for k in range(1, g + 1)]
    cond = [float((m >= k).sum() / max(float((m >= k - 1).sum()), 1.0)) for k in range(1, g + 1)]
    hist = [int((m == i).sum()) for i in range(g + 1)]
    return {"rounds": len(accepted), "tau": float((m + 1).mean()) if accepted else 0.0, "prefix_survival": survive,
            "conditional_acceptance": cond, "accept_length_histogram": {str(i + 1): h for i, h in enumerate(hist)}}


def ece(pred: torch.Tensor, label: torch.Tensor, bins: int = 20) -> float:
    """Expected calibration error with equal-width bins on [0, 1]."""
    idx = (pred * bins).long().clamp(max=bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += float(sel.float().mean()) * abs(float(pred[sel].mean()) - float(label[sel].float().mean()))
    return total


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
    survival = torch.cumprod(conf.double(), dim=1)  # a_{r,k}
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


def apply_temperatures(conf: torch.Tensor, temps: list[float]) -> torch.Tensor:
    """c' = sigmoid(logit(c) / T_k) per position k."""
    logit = torch.logit(conf.double().clamp(1e-6, 1 - 1e-6))
    return torch.sigmoid(logit / torch.tensor(temps, dtype=torch.float64)).to(conf.dtype)


def fit_sequential_temperatures(conf: torch.Tensor, accepted: torch.Tensor, grid: list[float] | None = None,
                                bins: int = 20) -> list[float]:
    """Sequential Temperature Scaling: for k = 1..g in order, the grid temperature minimising the ECE of
    the cumulative product at position k, with positions < k already scaled."""
    grid = grid or [math.exp(x / 20) for x in range(-46, 47)]  # 0.1 .. 10, log-spaced
    g = conf.shape[1]
    temps = [1.0] * g
    for k in range(g):
        label = (accepted >= k + 1).double()
        best = (float("inf"), 1.0)
        for t in grid:
            trial = temps[:k] + [t] + [1.0] * (g - k - 1)
            surv = torch.cumprod(apply_temperatures(conf, trial).double(), dim=1)[:, k]
            best = min(best, (ece(surv, label, bins), t))
        temps[k] = best[1]
    return temps


def threshold_sweep(conf: torch.Tensor, accepted: torch.Tensor, thresholds: list[float] | None = None) -> list[dict]:
    """Static threshold: verify the leading drafts whose cumulative confidence is >= t.

    Per threshold: verified drafts per round, acceptance rate (accepted / verified) and tokens per
    target step (min(m, L) + 1), from recorded rounds (conf (R, g), accepted (R,)).
    """
    thresholds = thresholds or [i / 20 for i in range(20)]
    survival = torch.cumprod(conf.double(), dim=1)
    out = []
    for t in thresholds:
        L = (survival >= t).int().cumprod(1).sum(1)  # leading slots above the threshold
        got = torch.minimum(accepted, L)
        out.append({"threshold": t, "verified_per_round": float(L.float().mean()),
                    "acceptance_rate": float(got.sum() / L.sum().clamp_min(1)), "tokens_per_step": float((got + 1).float().mean())})
    return out
