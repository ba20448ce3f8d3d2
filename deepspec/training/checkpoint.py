"""Checkpoints: DeepSpeed's (weights, optimizer, scheduler) plus each rank's data position and RNG
states, published with a ``complete`` marker once every rank has written its part.

Layout: ``<run_dir>/checkpoints/step_00000100/{DeepSpeed files, trainer_state_rank{r}.json and
.safetensors, complete}``. The ``complete`` marker is JSON: the step and the sha256 of every file of the
checkpoint, checked before anything is loaded. ``resume=auto`` takes the newest complete checkpoint that
checks out (a save cut short by a kill has no marker and is ignored; a corrupt one is skipped, loudly,
for the one before it); ``resume=never`` starts fresh; any other value is a checkpoint directory, which
must check out.

A checkpoint may come from elsewhere (``resume=<path>``), and a pickle can run code when loaded.
So the trainer's own state is JSON (step, data position, Python/NumPy RNG) plus safetensors (torch
RNG states), and before DeepSpeed unpickles its files each ``.pt`` is read once with
``weights_only=True``: tensors, plain containers and the three DeepSpeed classes its ZeRO 0-3
checkpoints hold (``DEEPSPEED_SAFE_GLOBALS``); any other object refuses the whole checkpoint.

Elastic resume: a checkpoint written by N ranks resumes on M. ZeRO-1/2/3 partition the optimizer
state by rank and DeepSpeed refuses to load it on another data-parallel size, so the checkpoint is
first converted (once, by rank 0) to DeepSpeed's universal format (per-parameter fp32 weights and
Adam moments, ``checkpoints/universal/step_*``) and loaded from there; ZeRO-0 keeps the whole
optimizer state in one file and loads as is. The data position continues the same epoch without the
samples the N ranks had consumed (``DataPosition.after_resize``).
"""
from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from deepspec import distributed
from deepspec.integrity import checksum_problems, read_json_checked, sha256_file, with_self_digest

log = logging.getLogger(__name__)
MARKER = "complete"
UNIVERSAL_INFO = "universal_checkpoint_info"  # deepspeed.checkpoint.constants.UNIVERSAL_CHECKPOINT_INFO


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds objects that loading would have to execute code to build."""


class CheckpointCorruptError(ValueError):
    """A checkpoint file's bytes are not the ones its ``complete`` marker recorded (or it is missing)."""


def write_marker(path: Path, step: int) -> None:
    """Publish a checkpoint: the marker lists every file's sha256 (written last, so its presence means complete)."""
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and not p.name.endswith(MARKER + ".tmp")
                   and p.name != MARKER)
    tmp = path / f".{MARKER}.tmp"
    marker = with_self_digest({"step": step, "sha256": {f: sha256_file(path / f) for f in files}})
    tmp.write_text(json.dumps(marker, indent=1, sort_keys=True))
    tmp.replace(path / MARKER)


def verify_checkpoint(path: Path) -> list[str]:
    """Problems of a checkpoint directory against its marker (empty: every file is as written)."""
    marker = path / MARKER
    if marker.read_bytes().strip().isdigit():  # a marker from before checksums: the step only
        log.warning("%s: written without checksums (an older deepspec); its files are not verified", path)
        return []
    try:
        recorded = read_json_checked(marker, "the checkpoint marker", CheckpointCorruptError)
    except (OSError, CheckpointCorruptError) as e:
        return [str(e)]
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), dict):
        return [f"{marker}: no file checksums (corrupt)"]
    out = []
    for name, digest in sorted(recorded["sha256"].items()):
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts:
            out.append(f"{marker}: entry {name!r} points outside the checkpoint (refused)")
            continue
        out += checksum_problems(path / Path(name).parent, {Path(name).name: digest})
    return out


def deepspeed_safe_globals() -> list:
    """The non-tensor classes DeepSpeed writes into ZeRO 0-3 checkpoints (optimizer states; checked on CPU, fp32)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def check_no_code(path: Path) -> None:
    """Read every ``.pt`` under ``path`` with the weights-only unpickler (nothing executed); raise
    UnsafeCheckpointError naming the file and what it holds if one needs more than data."""
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        for f in sorted(path.glob("*.pt")):
            try:
                torch.load(f, weights_only=True, map_location="cpu", mmap=True)
            except Exception as e:  # noqa: BLE001 -- the unpickler's refusal, or a corrupt file: both refuse
                first = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "global" in line),
                             str(e).splitlines()[0] if str(e) else type(e).__name__)
                raise UnsafeCheckpointError(f"{f}: refused, loading it would need more than tensors and plain data "
                                            f"({first[:300]})") from None


def save_trainer_state(path: Path, rank: int, state: dict) -> None:
    """``state`` (JSON-able) and this rank's RNG states -> trainer_state_rank{r}.json + .safetensors."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    rng = {"python": [py_version, list(py_internal), py_gauss],
           "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, str(path / f"trainer_state_rank{rank}.safetensors"))
    (path / f"trainer_state_rank{rank}.json").write_text(json.dumps({**state, "rng": rng}))


def saved_trainer_states(path: Path) -> list[dict]:
    """Every rank's trainer state (JSON part, RNG left out) of the checkpoint at ``path``, in rank order."""
    states = []
    while (meta := path / f"trainer_state_rank{len(states)}.json").exists():
        state = json.loads(meta.read_text())
        state.pop("rng", None)
        states.append(state)
    if not states:
        raise FileNotFoundError(f"{path / 'trainer_state_rank0.json'} missing: written by an older deepspec, whose "
                                "pickled trainer state is no longer loaded")
    return states


def load_trainer_state(path: Path, rank: int) -> dict:
    """Restore this rank's RNG states from ``path``; -> the rest of its trainer state."""
    meta = path / f"trainer_state_rank{rank}.json"
    if not meta.exists():
        raise FileNotFoundError(f"{meta} missing: was the checkpoint written by a run with fewer ranks "
                                "(or by an older deepspec, whose pickled trainer state is no longer loaded)?")
    state = json.loads(meta.read_text())
    rng, tensors = state.pop("rng"), load_file(str(path / f"trainer_state_rank{rank}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return state


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
            for path in reversed(self.complete()):
                problems = verify_checkpoint(path)
                if not problems:
                    log.warning("RESUME: resuming from %s", path)
                    return path
                log.error("RESUME: skipping the corrupt checkpoint %s:\n  %s", path, "\n  ".join(problems[:10]))
            log.warning("RESUME: resume=auto, no complete, intact checkpoint in %s: starting from scratch", self.dir)
            return None
        path = Path(resume)
        if not (path / MARKER).exists():
            raise FileNotFoundError(f"checkpoint.resume={resume}: not a complete checkpoint (no '{MARKER}' marker)")
        problems = verify_checkpoint(path)
        if problems:
            raise CheckpointCorruptError(f"checkpoint.resume={resume} is corrupt:\n  " + "\n  ".join(problems[:10]))
        log.warning("RESUME: resuming from %s", path)
        return path

    def save(self, engine, step: int, trainer_state: dict) -> Path:
        tag = f"step_{step:08d}"
        path = self.dir / tag
        if self.rank == 0 and (path / MARKER).exists():
            (path / MARKER).unlink()  # re-saving a step (after resume=never): not complete until done again
        distributed.barrier()
        # The universal-checkpoint marker lets an elastic resume convert this checkpoint (see the module doc).
        engine.save_checkpoint(str(self.dir), tag=tag, client_state={"step": step, UNIVERSAL_INFO: {"universal_checkpoint_version": 0.2}})
        save_trainer_state(path, self.rank, trainer_state)
        distributed.barrier()
        if self.rank == 0:
            write_marker(path, step)
            for old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(self.dir / "universal", ignore_errors=True)  # an elastic resume's conversion: done with
        distributed.barrier()
        return path

    def universal_copy(self, path: Path) -> Path:
        """``path`` converted to DeepSpeed's universal format (rank 0 converts, every rank waits) -> its folder.

        Read for code first (``check_no_code``): the converter unpickles the checkpoint's files."""
        out = self.dir / "universal" / path.name
        if self.rank == 0 and not (out / MARKER).exists():
            from argparse import Namespace

            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            check_no_code(path)
            shutil.rmtree(out, ignore_errors=True)
            log.warning("RESUME: converting %s to DeepSpeed's universal format in %s (resuming on another number "
                        "of ranks)", path, out)
            ds_to_universal(Namespace(input_folder=str(path), output_folder=str(out), num_extract_workers=1,
                                      num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
            (out / MARKER).write_text(str(path))
        distributed.barrier()
        return out

    def load(self, engine, path: Path, saved_ranks: int, universal: Path | None = None) -> None:
        """Restore engine state from ``path`` (or from its ``universal`` copy) and this rank's RNG states (rank
        0's where the checkpoint's ``saved_ranks`` were fewer). Refuses (UnsafeCheckpointError) a checkpoint whose
        files would run code when unpickled."""
        check_no_code(path)
        source = universal or path
        load_path, client = engine.load_checkpoint(str(source.parent), tag=source.name)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {source}")
        load_trainer_state(path, self.rank if self.rank < saved_ranks else 0)
