"""Progress: no ETA before a rate is known, rates of this phase only, log lines off a terminal."""
from __future__ import annotations

import logging

import pytest
import torch

from deepspec import progress as progress_mod
from deepspec.progress import Progress, TokenCounter


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: now[0])
    return now


def test_no_eta_until_a_unit_is_done_then_the_phase_rate(clock):
    p = Progress(100, "sample", "regenerate", tty=False)
    clock[0] += 228  # a slow first batch: 3 min 48 s with nothing finished
    p.update(tokens=5000)
    assert p.eta() is None and "ETA" not in p.status() and "first sample in progress" in p.status()
    assert "22 tok/s" in p.status()
    p.update(32)
    assert p.eta() == pytest.approx(68 / (32 / 228))
    assert "0.14 sample/s" in p.status() and "ETA 8:04" in p.status()  # 68 x 228 / 32 = 484.5 s


def test_resumed_units_count_but_do_not_inflate_the_rate(clock):
    p = Progress(100, "sample", "regenerate", tty=False)
    p.skip(50)
    clock[0] += 10
    p.update(10)
    assert p.n == 60 and p.rates()[0] == pytest.approx(1.0) and p.eta() == pytest.approx(40.0)


def test_off_a_terminal_it_writes_periodic_log_lines(clock, caplog):
    with caplog.at_level(logging.INFO, logger="deepspec.progress"):
        p = Progress(10, "row", "shard 1/2: target forward", tty=False, every_s=30)
        for _ in range(10):
            clock[0] += 10
            p.update(1, tokens=100)
        p.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "shard 1/2: target forward: 10 rows to do"
    assert len(lines) == 1 + 3 + 1  # start, one line per 30 s, the last line
    assert lines[-1].startswith("shard 1/2: target forward: 10/10 rows (100%), 0.1 row/s, 10 tok/s, elapsed 1:40")


def test_disabled_progress_is_silent(caplog):
    with caplog.at_level(logging.INFO, logger="deepspec.progress"):
        p = Progress(10, "row", "x", enabled=False, tty=False)
        p.update(3, tokens=5)
        p.close()
    assert not caplog.records


def test_token_counter_skips_the_prompt_and_finished_rows(clock):
    p = Progress(2, "sample", "regenerate", tty=False)
    counter = TokenCounter(p, pad_token_id=0)
    counter.put(torch.ones(2, 7, dtype=torch.long))  # the prompt ids
    counter.put(torch.tensor([5, 6]))
    counter.put(torch.tensor([0, 9]))  # row 0 finished: padded
    counter.end()
    assert p.tokens == 3
