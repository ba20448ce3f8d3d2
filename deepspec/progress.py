"""Progress that tells the truth, on a terminal and in a log file.

One ``Progress`` per phase of work (regenerating a shard's answers, its target forward, training),
so a rate is never diluted by an earlier phase's time. It counts units (samples, rows, steps) and,
where given, tokens; it shows an ETA only once at least one unit is done (before that it says what
it is waiting for, with the token rate if tokens are flowing). On a terminal it is a tqdm bar;
when stderr is not a terminal (CI, Slurm logs, pipes) it writes one log line every ``every_s``
seconds instead of carriage-return spam, and a last line at the end.
"""
from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("deepspec.progress")


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Counts ``total`` units of ``unit`` for one phase named ``desc``; a no-op when not ``enabled``."""

    def __init__(self, total: int, unit: str, desc: str, enabled: bool = True, initial: int = 0,
                 every_s: float = 30.0, tty: bool | None = None):
        self.total, self.unit, self.desc, self.enabled, self.every_s = total, unit, desc, enabled, every_s
        self.n, self.initial, self.tokens, self.postfix = initial, initial, 0, ""
        self.t0 = self.last_line = time.monotonic()
        tty = sys.stderr.isatty() if tty is None else tty
        self.bar = (tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True,
                         bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {postfix}")
                    if enabled and tty else None)
        if enabled and not tty:
            log.info("%s: %d %ss to do", desc, total - initial, unit)

    # ------------------------------------------------------------------ counting
    def update(self, n: int = 0, tokens: int = 0) -> None:
        """``n`` more units done, ``tokens`` more tokens processed (either may be 0)."""
        if not self.enabled:
            return
        self.n += n
        self.tokens += tokens
        if self.bar is not None:
            self.bar.set_postfix_str(self.status(), refresh=False)
            self.bar.update(n) if n else self.bar.refresh()
        elif time.monotonic() - self.last_line >= self.every_s:
            self.last_line = time.monotonic()
            log.info("%s: %s", self.desc, self.line())

    def skip(self, n: int) -> None:
        """``n`` units found already done (a resumed run): counted, but not in the rates."""
        if self.enabled:
            self.n, self.initial = self.n + n, self.initial + n
            if self.bar is not None:
                self.bar.update(n)

    def set_postfix(self, text: str) -> None:
        """Extra figures shown after the rates (e.g. a training loss)."""
        self.postfix = text

    def write(self, message: str) -> None:
        """A message that does not break the bar."""
        if self.bar is not None:
            self.bar.write(message)
        else:
            log.info("%s", message)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(self.status(), refresh=False)
            self.bar.close()
        else:
            log.info("%s: %s", self.desc, self.line())
        self.enabled = False

    # ------------------------------------------------------------------ what is shown
    def rates(self) -> tuple[float, float]:
        """(units/s, tokens/s) over this phase so far."""
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        return (self.n - self.initial) / elapsed, self.tokens / elapsed

    def eta(self) -> float | None:
        """Seconds left, or None until a rate is known (no unit done yet)."""
        rate, _ = self.rates()
        return (self.total - self.n) / rate if self.n > self.initial else None

    def status(self) -> str:
        """Rates and ETA: '12.3 sample/s, 1,234 tok/s, elapsed 0:42, ETA 1:05'."""
        rate, tok_rate = self.rates()
        parts = [f"{rate:.3g} {self.unit}/s" if self.n > self.initial else f"first {self.unit} in progress"]
        if self.tokens:
            parts.append(f"{tok_rate:,.0f} tok/s")
        parts.append(f"elapsed {_duration(time.monotonic() - self.t0)}")
        eta = self.eta()
        if eta is not None and self.n < self.total:
            parts.append(f"ETA {_duration(eta)}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def line(self) -> str:
        pct = 100.0 * self.n / self.total if self.total else 100.0
        return f"{self.n}/{self.total} {self.unit}s ({pct:.0f}%), {self.status()}"


class TokenCounter:
    """An HF ``generate`` streamer that reports generated tokens to a ``Progress`` as they are made.

    ``generate`` calls ``put`` once with the prompt ids, then once per step with the (B,) new tokens;
    rows that already finished contribute ``pad_token_id`` and are not counted.
    """

    def __init__(self, progress: Progress, pad_token_id: int | None):
        self.progress, self.pad, self.prompt_seen = progress, pad_token_id, False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.progress.update(tokens=int((value != self.pad).sum()) if self.pad is not None else value.numel())

    def end(self) -> None:
        self.prompt_seen = False
