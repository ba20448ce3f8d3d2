"""Confidence calibration: cumulative survival, ECE, and Sequential Temperature Scaling (STS).

Both the decoding engine (which schedules verification from calibrated confidences) and the
evaluation (which reports calibration) import this module; it imports neither.

A drafter gives per-slot confidences c_{r,1..g}: c_k predicts P(slot k survives | slots < k did).
The predicted probability that the first k drafts all survive is the cumulative product

    a_{r,k} = prod_{i<=k} c_{r,i}                                    (``cumulative_survival``)

STS (DSpark paper, Sec. 5): for k = 1..g *in order*, pick the temperature T_k from a grid that
minimises the ECE of a_{.,k} against the observed 1[m >= k], with T_1..T_{k-1} already fixed.
A temperature acts on the logit: c' = sigmoid(logit(c) / T_k).
"""
from __future__ import annotations

import math

import torch


def cumulative_survival(conf: torch.Tensor) -> torch.Tensor:
    """conf (..., g) per-slot confidences -> a (..., g) = cumulative product along the block (float64)."""
    return torch.cumprod(conf.double(), dim=-1)


def ece(pred: torch.Tensor, label: torch.Tensor, bins: int = 20) -> float:
    """Expected calibration error with equal-width bins on [0, 1]. pred, label (N,)."""
    idx = (pred * bins).long().clamp(0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += float(sel.float().mean()) * abs(float(pred[sel].mean()) - float(label[sel].float().mean()))
    return total


def apply_temperatures(conf: torch.Tensor, temps: list[float] | None) -> torch.Tensor:
    """conf (..., g) -> sigmoid(logit(c_k) / T_k) per slot k (unchanged when ``temps`` is empty/None).

    Slots beyond the fitted temperatures (a longer block than the fit saw) reuse the last one.
    """
    if not temps:
        return conf
    g = conf.shape[-1]
    t = torch.tensor((list(temps) + [temps[-1]] * g)[:g], dtype=torch.float64, device=conf.device)
    logit = torch.logit(conf.double().clamp(1e-6, 1 - 1e-6))
    return torch.sigmoid(logit / t).to(conf.dtype)


def fit_sequential_temperatures(conf: torch.Tensor, accepted: torch.Tensor, grid: list[float] | None = None,
                                bins: int = 20) -> list[float]:
    """STS. conf (R, g) raw confidences of R recorded rounds, accepted (R,) drafts accepted m per round.

    For k = 1..g in order: the grid temperature minimising the ECE of the cumulative product at
    position k, positions < k already scaled by their fitted temperatures (later ones unscaled:
    they do not enter a_k).
    """
    grid = grid or [math.exp(x / 20) for x in range(-46, 47)]  # 0.1 .. 10, log-spaced
    g = conf.shape[1]
    temps = [1.0] * g
    for k in range(g):
        label = (accepted >= k + 1).double()
        best = (float("inf"), 1.0)
        for t in grid:
            trial = temps[:k] + [t] + [1.0] * (g - k - 1)
            surv = cumulative_survival(apply_temperatures(conf, trial))[:, k]
            best = min(best, (ece(surv, label, bins), t))
        temps[k] = best[1]
    return temps
