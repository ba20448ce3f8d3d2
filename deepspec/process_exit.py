"""How every entry point ends: its work written, then a clean, deterministic exit status.

A training process once died with ``terminate called without an active exception`` (SIGABRT)
*after* it had logged ``done``: a native thread (a C++ ``std::thread`` owned by a library: the
process group's, oneDNN's, DeepSpeed's) was still joinable when the interpreter tore down its
modules, so a run that had finished reported failure and the demo stopped before eval. Python
cannot join native threads it did not start, and the order of interpreter teardown is not ours.

So ``run_entry_point`` runs the stage, joins the Python threads that are still running (a shard
writer, a logger; each should already be joined by its owner, and a straggler is named in the
log), flushes logging and the standard streams, and ends the process with ``os._exit``: the exit
status is the stage's own, whatever native threads remain. Everything a stage writes is closed
by the stage itself before it returns (files, W&B runs, process groups), never left to teardown.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import sys
import threading
import traceback
from typing import Callable, NoReturn

log = logging.getLogger(__name__)


EX_IOERR = 74  # sysexits.h: an input/output error (full disk, read-only or forbidden output)
STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied", errno.EPERM: "not permitted"}


def storage_errors_in_one_line(stage: str):
    """Decorator for a stage's main: a full disk, a read-only or forbidden output folder ends the stage with one
    line naming the file and what to do (exit status 74), not a traceback. The stages publish files atomically
    (temporary name, then rename), so what was finished is complete and what was not is not mistaken for it."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except OSError as e:
                if e.errno not in STORAGE_ERRNOS:
                    raise
                where = e.filename or "its output"
                log.error("%s stopped: %s writing %s. Finished work is kept; free space (or make the folder writable) "
                          "and rerun the same command to continue.", stage, STORAGE_ERRNOS[e.errno], where)
                raise SystemExit(EX_IOERR) from None
        return run
    return wrap


def hydra_errors_in_one_line(stage: str, hydra_main: Callable[[], object]) -> None:
    """Run a stage's ``@hydra.main`` so that what Hydra itself hits before the stage starts is one line too.

    Hydra creates the run folder (``hydra.run.dir``, inside the stage's output) before calling the stage, and
    reports any error with a trimmed traceback and status 1: a read-only or full output disk would never reach
    ``storage_errors_in_one_line``. With ``HYDRA_FULL_ERROR=1`` Hydra re-raises instead; here a storage error
    ends in the same one line and status 74; a Hydra error (an unknown config group, a bad override) or a config
    the stage refuses (``ConfigError``) in its message alone, status 1. Anything else propagates unchanged
    (``run_entry_point`` prints it with its traceback).
    """
    from hydra.errors import HydraException

    from deepspec.config.base import ConfigError

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        hydra_main()
    except ConfigError as e:  # the stage's own validation: its message lists every bad key
        raise SystemExit(f"{stage}: {e}") from None
    except HydraException as e:  # first: a missing config is also an OSError (errno None)
        cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ""
        raise SystemExit(f"{stage}: {type(e).__name__}: {e}{cause}") from None
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:
            raise
        log.error("%s stopped before starting: %s creating %s. Nothing was written; make the output folder writable "
                  "(or free space) and rerun the same command.", stage, STORAGE_ERRNOS[e.errno], e.filename or "its output")
        raise SystemExit(EX_IOERR) from None


# What gloo and NCCL raise on the survivors when another rank of the job dies mid-collective (its host went down,
# it was OOM-killed): the survivors' tracebacks would only point at whichever collective was in flight.
PEER_LOST_SIGNS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
                   "remote process exited or there was a network error")


def peer_lost(exc: BaseException) -> bool:
    """True when ``exc`` is a collective failing because another rank of the job is gone."""
    import torch.distributed as dist

    text = str(exc)
    from_collectives = any(lib in text for lib in ("gloo", "NCCL", "c10d"))  # not a local pipe or a loader worker
    return isinstance(exc, (RuntimeError, dist.DistError)) and from_collectives and any(sign in text for sign in PEER_LOST_SIGNS)


def exit_status(exc: SystemExit) -> int:
    """The status ``sys.exit(x)`` asks for: None -> 0, int -> itself, anything else printed -> 1."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def join_python_threads(timeout_s: float = 30.0) -> list[str]:
    """Join every non-daemon thread but this one; -> the names of those still alive after ``timeout_s``."""
    left = []
    for t in threading.enumerate():
        if t is threading.current_thread() or t.daemon:
            continue
        t.join(timeout_s)
        if t.is_alive():
            left.append(t.name)
    return left


def run_entry_point(main: Callable[[], object]) -> NoReturn:
    """Run ``main`` and end the process with its exit status (0 when it returns)."""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = exit_status(e)
    except KeyboardInterrupt:
        code = 130
    except BaseException as e:  # noqa: BLE001 -- reported here, then the status says it failed
        if peer_lost(e):
            log.error("stopped: another rank of this job died (%s). Its own log says why; the last complete checkpoint "
                      "(or finished shards) is kept: rerun the same command on every node to resume.", str(e).splitlines()[0][:300])
        else:
            traceback.print_exc()
        code = 1
    if "wandb" in sys.modules:  # wait for wandb's service to write what the stage logged (normal exit does this)
        try:
            sys.modules["wandb"].teardown()
        except Exception:  # noqa: BLE001 -- a tracking failure must not change a finished stage's status
            log.exception("wandb teardown failed")
    left = join_python_threads()
    if left:
        log.warning("threads still running at exit: %s", ", ".join(left))
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
