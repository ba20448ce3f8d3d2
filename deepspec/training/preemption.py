"""Stop requests: checkpoint and exit cleanly before Slurm's time limit or a preemption.

Two ways in, because a signal does not reach every rank on every node through torchrun (torchrun
dies on SIGUSR1 and forwards SIGTERM with a short grace period):

* a signal (SIGUSR1, SIGUSR2 or SIGTERM) delivered to a training process itself: a plain
  ``python`` run, ``scancel``, a node preemption that signals every process, or submitit's
  time-limit warning (SIGUSR2 under the Hydra ``submitit_slurm`` launcher);
* a file: ``slurm/train.sbatch`` asks Slurm for a warning signal to the batch shell
  (``--signal=B:USR1@<seconds>``); its trap creates ``$DEEPSPEC_STOP_FILE`` on the shared file
  system, which every rank sees at its next step.

Ranks agree through an all-reduce (MAX) every step, so they all save the same checkpoint and
stop together. Then ``after_checkpoint`` hands the signal to whatever handler was installed before
ours (submitit's requeues the job and exits); otherwise the trainer exits with
``PREEMPTED_EXIT_CODE`` and the batch script requeues the job. Either way the requeued job resumes
from that checkpoint (``checkpoint.resume=auto``).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from deepspec.distributed import cpu_group

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; slurm/train.sbatch requeues on it
STOP_FILE_ENV = "DEEPSPEC_STOP_FILE"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class StopRequest:
    """Watches for a stop request; ``requested()`` is a collective (call it on every rank)."""

    def __init__(self, stop_file: str | os.PathLike | None = None):
        self.stop_file = Path(stop_file) if stop_file else (Path(os.environ[STOP_FILE_ENV]) if os.environ.get(STOP_FILE_ENV) else None)
        self.signal_name: str | None = None
        self._signum: int | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Only set a flag: the step in flight finishes, then the loop checkpoints at a step boundary.
        self.signal_name, self._signum = signal.Signals(signum).name, signum

    def after_checkpoint(self) -> None:
        """Run the handler that our signal displaced (submitit: requeue and exit), if it was a Python one."""
        previous = self._previous.get(self._signum) if self._signum is not None else None
        if callable(previous):
            log.warning("handing %s to the handler installed before ours (%s)", self.signal_name, getattr(previous, "__qualname__", previous))
            previous(self._signum, None)

    def local(self) -> bool:
        return self.signal_name is not None or (self.stop_file is not None and self.stop_file.exists())

    def requested(self) -> bool:
        flag = torch.tensor([1 if self.local() else 0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=cpu_group())
        return bool(flag.item())

    def reason(self) -> str:
        if self.signal_name:
            return f"signal {self.signal_name}"
        if self.stop_file is not None and self.stop_file.exists():
            return f"stop file {self.stop_file}"
        return "another rank's request"
