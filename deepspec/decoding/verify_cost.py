"""This machine's verify cost, measured point by point when a run first needs it, and kept.

A point (R, W) is the seconds of one target forward of R rows x W new tokens after ``context`` cached ones,
the rollback included, as in the engine (best of ``repeats``). Nothing is measured up front: a single-prompt
eval asks for row 1 and the widths it verifies, a serving run adds the row counts it reaches (rows between
powers of two are interpolated from the two around them), and the serving simulation reads packed batches
on a coarse grid of widths (powers of two, interpolated). Each point is written to the machine's profile
file (``$DEEPSPEC_CACHE`` or ``~/.cache/deepspec``, ``verify_cost/<key digest>.points.json``) as soon as it
is measured, so a run stopped early keeps what it measured and the next run measures only what is new.

A busy CPU. A point measured while other processes want the cores (``cpu_is_contended``) can only be too
slow, never too fast: contention adds time. It is kept, flagged busy, and used (it is what this machine
gave, and the draft-cost gate corrects a profile's error per load within a run). The first later run that
needs it on a quiet CPU measures it once more and keeps the faster value; a point measured on a quiet CPU
is final. So a busy first run costs the next quiet run one re-measurement of the points it uses, not a
whole profile, and a pessimistic point never outlives the first quiet run that needs it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from deepspec.decoding.scheduler import cost_key, cpu_is_contended

log = logging.getLogger(__name__)

PROFILE_CONTEXT_TOKENS = 128  # cached tokens before each measured forward (the profile key records it)


def powers_of_two_around(n: int) -> tuple[int, int]:
    """(largest power of two <= n, smallest >= n): the grid points an unmeasured row count or width sits between."""
    lo = 1 << (n.bit_length() - 1)
    return lo, (lo if lo == n else 2 * lo)


def combine(a: tuple[float, bool], b: tuple[float, bool]) -> tuple[float, bool]:
    """Two measurements (seconds, quiet) of one point -> the faster (noise only ever adds time), quiet if either was:
    once a quiet CPU has measured the point, it is final."""
    return min(a[0], b[0]), a[1] or b[1]


class VerifyCostProfile:
    """Seconds of one verify forward of R rows x W tokens on this machine: ``cost(R, W)``, measured on first use.

    ``__call__`` (the engine: exact widths) and ``coarse`` (packed batches: widths on powers of two) read the
    points through a monotone repair: a forward of fewer rows or tokens never costs more than a larger one
    measured (a stall shows up as a small forward that "costs" more than a big one). ``ensure`` measures what a
    run will need before it is timed; ``measured_now`` lists the points this process measured.
    """

    def __init__(self, target, path: Path | None, context: int = PROFILE_CONTEXT_TOKENS, repeats: int = 3):
        self.target, self.path, self.context, self.repeats = target, path, context, repeats
        self.key = cost_key(target, context)
        self.points: dict[tuple[int, int], tuple[float, bool]] = self._read()  # (R, W) -> (seconds, quiet)
        self.read_points = len(self.points)
        self.measured_now: list[tuple[int, int]] = []
        self._rechecked: set[tuple[int, int]] = set()  # busy points this process has measured again (once each)
        self._memo: dict[tuple[int, int, bool], float] = {}  # the engine asks for the same few (R, W) every round
        self._context_cache = None  # (R, TargetCache holding ``context`` tokens of R rows): the last row count measured
        self._busy_warned = False

    @classmethod
    def open(cls, target, cache_dir: str | None = None) -> "VerifyCostProfile":
        """This target's profile on this device/dtype/thread count (the points measured so far; nothing measured yet)."""
        key = cost_key(target, PROFILE_CONTEXT_TOKENS)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        root = Path(cache_dir or os.environ.get("DEEPSPEC_CACHE", Path.home() / ".cache" / "deepspec"))
        return cls(target, root / "verify_cost" / f"{digest}.points.json")

    # ------------------------------------------------------------------ reading the cost
    def __call__(self, R: int, W: int) -> float:
        """Seconds of R rows x W tokens: W measured exactly, R interpolated between the powers of two around it."""
        return self._lookup(R, W, coarse_width=False)

    def coarse(self, R: int, W: int) -> float:
        """As ``__call__``, with W too interpolated between powers of two: a packed batch of up to a few hundred
        tokens costs 1 + log2(W) points instead of W."""
        return self._lookup(R, W, coarse_width=True)

    def ensure(self, rows, widths) -> None:
        """Measure now the points a run will ask for (so that no measurement falls inside a timed generation)."""
        for R in rows:
            for W in widths:
                self(R, W)

    def summary(self) -> dict:
        """For a run's results: how much of the profile this run read, and measured."""
        return {"profile": str(self.path), "points_read": self.read_points, "points_measured": len(self.measured_now),
                "measured": [list(p) for p in self.measured_now],
                "busy_points": sorted([list(p) for p, (_, quiet) in self.points.items() if not quiet])}

    def _lookup(self, R: int, W: int, coarse_width: bool) -> float:
        if (R, W, coarse_width) not in self._memo:
            self._memo[R, W, coarse_width] = self._interpolate(R, W, coarse_width)
        return self._memo[R, W, coarse_width]

    def _interpolate(self, R: int, W: int, coarse_width: bool) -> float:
        if coarse_width and W & (W - 1):  # between two powers of two
            lo, hi = powers_of_two_around(W)
            return self._interpolate(R, lo, True) + (W - lo) / (hi - lo) * (self._interpolate(R, hi, True) - self._interpolate(R, lo, True))
        lo, hi = powers_of_two_around(R)
        self.point(lo, W), self.point(hi, W)  # both measured before either is repaired: the repair sees both
        at_lo = self.repaired(lo, W)
        return at_lo if lo == hi else at_lo + (R - lo) / (hi - lo) * (self.repaired(hi, W) - at_lo)

    def repaired(self, R: int, W: int) -> float:
        """Point (R, W), measured if need be, lowered to the cheapest point measured at least as large."""
        own = self.point(R, W)
        return min([own] + [s for (r, w), (s, _) in self.points.items() if r >= R and w >= W])

    def point(self, R: int, W: int) -> float:
        """The measured seconds of (R, W): from the profile, or measured now (a busy point again once, on a quiet CPU)."""
        known = self.points.get((R, W))
        if known is not None and (known[1] or (R, W) in self._rechecked or cpu_is_contended(self.target.device)):
            return known[0]
        if known is not None:
            self._rechecked.add((R, W))
        if not self.measured_now:  # what a run waits for, the first time it waits
            log.info("measuring the verify cost of this target on this machine, point by point as needed (each point: "
                     "best of %d forwards of R rows x W tokens; first R=%d, W=%d) -> %s", self.repeats, R, W, self.path)
        measured = self._measure(R, W)
        self.points[R, W] = combine(known, measured) if known else measured
        self.measured_now.append((R, W))
        self._memo.clear()  # a new point can lower the repaired cost of smaller ones
        self._write()
        return self.points[R, W][0]

    # ------------------------------------------------------------------ measuring
    @torch.no_grad()
    def _measure(self, R: int, W: int) -> tuple[float, bool]:
        """(best seconds of ``repeats`` forwards of R x W after the context, measured on a quiet CPU)."""
        dev = self.target.device
        quiet = not cpu_is_contended(dev)
        if not quiet and not self._busy_warned:
            self._busy_warned = True
            log.warning("measuring the verify cost while the CPU was busy (1-min load average %.1f on %d cores): the "
                        "points are kept flagged busy and measured again by the first run on a quiet CPU",
                        os.getloadavg()[0], os.cpu_count())
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        cache = self._cache_of(R)
        cache.record(W)  # a hybrid target's verify pays for its per-position states, as in the engine
        nothing_kept = torch.zeros(R, dtype=torch.long, device=dev)
        tokens = torch.ones(R, W, dtype=torch.long, device=dev)
        best = float("inf")
        for _ in range(self.repeats):
            sync()
            t = time.perf_counter()
            self.target(tokens, past_key_values=cache)
            cache.keep_prefix(nothing_kept)  # the rollback is part of a round's verify cost
            sync()
            best = min(best, time.perf_counter() - t)
            cache.drop_slots(W)
        return best, quiet and not cpu_is_contended(dev)

    def _cache_of(self, R: int):
        """A target cache holding ``context`` tokens of R rows, prefilled once per row count in a row."""
        from deepspec.decoding.target_cache import TargetCache

        if self._context_cache is None or self._context_cache[0] != R:
            cache = TargetCache(self.target.config)
            self.target(torch.zeros(R, self.context, dtype=torch.long, device=self.target.device), past_key_values=cache)
            self._context_cache = (R, cache)
        return self._context_cache[1]

    # ------------------------------------------------------------------ the profile file
    def _read(self) -> dict[tuple[int, int], tuple[float, bool]]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            if data["key"] != self.key:
                return {}
            return {(int(R), int(W)): (float(s), bool(quiet)) for R, W, s, quiet in data["points"]}
        except (ValueError, TypeError, KeyError):
            log.warning("%s: unreadable verify-cost profile, measuring again", self.path)
            return {}

    def _write(self) -> None:
        """Merge with the file (another process may have added points since) and replace it atomically."""
        if self.path is None:
            return
        for p, m in self._read().items():
            self.points[p] = combine(self.points[p], m) if p in self.points else m
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": self.key, "points": [[R, W, s, q] for (R, W), (s, q) in sorted(self.points.items())]}))
        tmp.replace(self.path)
