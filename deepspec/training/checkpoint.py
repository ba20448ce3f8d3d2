"""Checkpoints: DeepSpeed's (weights, optimizer, scheduler) plus each rank's data position and RNG
states, published with a ``complete`` marker once every rank has written its part.

Layout: ``<run_dir>/checkpoints/step_00000100/{DeepSpeed files, trainer_state_rank{r}.pt, complete}``.
``resume=auto`` takes the newest complete checkpoint (a save cut short by a kill has no marker and
is ignored); ``resume=never`` starts fresh; any other value is a checkpoint directory.
"""
from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from deepspec import distributed

log = logging.getLogger(__name__)
MARKER = "complete"


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_states(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last: int, rank: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last, self.rank = keep_last, rank

    def complete(self) -> list[Path]:
        return sorted(p.parent for p in self.dir.glob(f"step_*/{MARKER}"))

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint to resume from, announced loudly, or None."""
        if resume == "never":
            if self.complete() and self.rank == 0:
                log.warning("RESUME: resume=never, starting from scratch although %s holds checkpoints "
                            "(they will be overwritten as training reaches their steps)", self.dir)
            return None
        if resume == "auto":
            found = self.complete()
            if not found:
                log.warning("RESUME: resume=auto, no complete checkpoint in %s: starting from scratch", self.dir)
                return None
            path = found[-1]
        else:
            path = Path(resume)
            if not (path / MARKER).exists():
                raise FileNotFoundError(f"checkpoint.resume={resume}: not a complete checkpoint (no '{MARKER}' marker)")
        log.warning("RESUME: resuming from %s", path)
        return path

    def save(self, engine, step: int, trainer_state: dict) -> Path:
        tag = f"step_{step:08d}"
        path = self.dir / tag
        if self.rank == 0 and (path / MARKER).exists():
            (path / MARKER).unlink()  # re-saving a step (after resume=never): not complete until done again
        distributed.barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state={"step": step})
        torch.save({**trainer_state, "rng": rng_states()}, path / f"trainer_state_rank{self.rank}.pt")
        distributed.barrier()
        if self.rank == 0:
            (path / MARKER).write_text(str(step))
            for old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()
        return path

    def load(self, engine, path: Path) -> dict:
        """Restore engine state from ``path``; returns this rank's trainer state (RNG already restored)."""
        load_path, client = engine.load_checkpoint(str(path.parent), tag=path.name)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
        state_file = path / f"trainer_state_rank{self.rank}.pt"
        if not state_file.exists():
            raise FileNotFoundError(f"{state_file} missing: was the checkpoint written by a run with another number of ranks?")
        state = torch.load(state_file, weights_only=False)
        set_rng_states(state.pop("rng"))
        return state
