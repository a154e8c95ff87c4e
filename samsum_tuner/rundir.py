"""The run directory: one run at a time, written into only when asked, and no earlier run ever deleted.

- `RunLock`: an exclusive `flock` on `OUTPUT/.lock` for the run's life, holding who took it (pid, host, start,
  command). The kernel drops the lock when its process dies, so a lock left by a killed run is free and taken
  over with a note; a live one refuses the second run, naming its holder.
- `check_output_dir`: a non-empty folder is written into only by resuming it or with overwrite_output_dir;
  `resume=auto` with nothing to resume says what the folder holds instead of starting over it.
- Whatever a new run would replace (an overwritten run; what a run resumed from an earlier checkpoint abandons)
  moves into a folder of its own under `OUTPUT/.overwritten/`.
"""
from __future__ import annotations

import fcntl
import itertools
import json
import os
import socket
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Callable

from .checkpoint import STAGING, SUMMARY, TRASH, complete_checkpoints, step_of
from .resume import checkpoint_step, resolve_resume, unusable
from .errors import ConfigError, SamsumTunerError

LOCK = ".lock"
ASIDE = ".overwritten"
NOT_A_RUN = {LOCK, ASIDE, TRASH, STAGING}  # bookkeeping, no run's content: an aborted save's staging is garbage


def run_content(run_dir: str | os.PathLike) -> list[Path]:
    d = Path(run_dir)
    return sorted(p for p in d.iterdir() if p.name not in NOT_A_RUN) if d.is_dir() else []


# ---------------------------------------------------------------- the lock
def _read(fd: int) -> dict | None:
    try:
        record = json.loads(os.pread(fd, 65536, 0) or b"null")
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _who(record: dict | None) -> str:
    if not record:
        return "a process that has not said who it is yet"
    return (f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}: "
            f"{record.get('command')}")


def lock_holder(run_dir: str | os.PathLike) -> str | None:
    """Who holds the run directory's lock, if another process does. Creates nothing."""
    try:
        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: two runs testing at once do not see each other
        except BlockingIOError:
            record = _read(fd)
            mine = record is not None and (record.get("pid"), record.get("host")) == (os.getpid(), socket.gethostname())
            return None if mine else _who(record)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _release(fd: int, path: str, made: str | None) -> None:
    try:  # unlinked while still held: a process waiting on this inode sees it gone and opens the next one
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            os.unlink(path)
    except OSError:
        pass
    os.close(fd)
    if made:  # the folder this lock created, if the run wrote nothing into it
        try:
            os.rmdir(made)
        except OSError:
            pass


class RunLock:
    """The run directory's lock; released by `release()`, or when the object is collected or the process exits."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run = Path(run_dir)
        self.path = self.run / LOCK
        self._release: weakref.finalize | None = None
        self.released = False  # set by release() on every process, the main one's lock or not

    def acquire(self, wait_s: float = 2.0) -> str | None:
        """Take the lock or refuse naming its holder (after `wait_s`: another run's test of it takes a moment).
        Returns a note when a dead run's lock was taken over."""
        made = not self.run.exists()
        self.run.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait_s
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                record = _read(fd)
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise ConfigError(f"train.output_dir: {self.run} is in use by another run ({_who(record)}); wait for "
                                  "it to end, or choose another folder") from None
            try:  # the file locked must still be the one at the path: a releasing holder unlinks it
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        left = _read(fd)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._release = weakref.finalize(self, _release, fd, str(self.path), str(self.run) if made else None)
        return f"took over the lock of a run that is no longer running ({_who(left)})" if left else None

    def release(self) -> None:
        self.released = True
        if self._release is not None:
            self._release()


def decided_by_main(decide: Callable[[], Any], *, device=None) -> Any:
    """`decide()` on the main process (rank 0 of the process group, if there is one) only; every process returns
    its result or raises its error (a broadcast when several processes run, so that all stop with one message)."""
    import torch.distributed as dist

    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    result = error = None
    if not several or dist.get_rank() == 0:
        try:
            result = decide()
        except SamsumTunerError as e:
            error = e
    if several:
        box = [result, error]
        dist.broadcast_object_list(box, src=0, device=device)
        result, error = box
    if error is not None:
        raise error
    return result


# ---------------------------------------------------------------- what may be written
def describe(run_dir: str | os.PathLike) -> str:
    """What a run directory holds, in a few words: the run's outcome and its first entries."""
    run = Path(run_dir)
    try:
        status = json.loads((run / SUMMARY).read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        status = None
    what = ("a finished run" if status == "ok" else f"a run that ended with status {status}" if status
            else "a run that did not finish")
    names = [p.name for p in run_content(run)]
    return f"{what} ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})"


def check_output_dir(run_dir: str | os.PathLike, *, overwrite: bool, resume: str | None, settings: dict | None = None,
                     notes: list[str] | None = None) -> Path | None:
    """A run directory is written into only when asked: by resuming it, or by overwrite_output_dir. Returns the
    checkpoint to resume from, if any; notes say which checkpoints auto skipped and why."""
    out = Path(run_dir)
    notes = notes if notes is not None else []
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir: {out} exists and is not a folder")
    _refuse_over_inputs(out, settings)
    holder = lock_holder(out)
    if holder:
        raise ConfigError(f"train.output_dir: {out} is in use by another run ({holder}); wait for it to end, or "
                          "choose another folder")
    found = resolve_resume(resume, out, settings, notes)
    occupied = bool(run_content(out))
    if found is not None and not _inside(found, out) and occupied and not overwrite:
        raise ConfigError(f"train.output_dir: {out} already holds a run, and resuming {found} (another folder's "
                          "checkpoint) would write over it: choose another folder, or set "
                          f"train.overwrite_output_dir=true (the old run moves to {out / ASIDE}/)")
    if found is not None or not occupied or overwrite or resume not in (None, "auto"):
        return found
    if resume == "auto":
        why = f" ({'; '.join(notes)})" if notes else ""
        raise ConfigError(f"train.output_dir: resume=auto has nothing to resume in {out}: it holds {describe(out)} "
                          f"and no checkpoint resume can use{why}; set train.overwrite_output_dir=true to start again "
                          f"(the old run moves to {out / ASIDE}/), or choose another folder")
    lora = settings["lora"]["enabled"] if settings else None
    resumable = any(unusable(p, lora) is None for p in complete_checkpoints(out))
    hint = " or resume=auto to continue it" if resumable else ""
    raise ConfigError(f"train.output_dir: {out} already holds a run; choose another folder, set "
                      f"train.overwrite_output_dir=true{hint}")


def _refuse_over_inputs(out: Path, settings: dict | None) -> None:
    """The run's own inputs (a local model or data folder) are never in what overwrite_output_dir moves aside, nor
    mixed with a run's files: train.output_dir is not such a folder, nor one above it."""
    inputs = {"model.name": (settings or {}).get("model", {}).get("name"),
              "data.source": (settings or {}).get("data", {}).get("source"),
              "SAMSUM_DATA_DIR": os.environ.get("SAMSUM_DATA_DIR")}
    run = out.expanduser().resolve()
    for key, value in inputs.items():
        folder = Path(str(value)).expanduser() if value else None
        if folder is not None and folder.is_dir() and (run == folder.resolve() or run in folder.resolve().parents):
            raise ConfigError(f"train.output_dir: {out} {'is' if run == folder.resolve() else 'holds'} the folder "
                              f"of {key} ({value}): a run writes there, and overwrite_output_dir would move it "
                              "aside; choose another folder")


def _inside(checkpoint: str | os.PathLike, run: str | os.PathLike) -> bool:
    return Path(checkpoint).resolve().parent == Path(run).resolve()


# ---------------------------------------------------------------- moving earlier runs aside
def set_aside(run_dir: str | os.PathLike, entries: list[Path]) -> Path | None:
    """Move these entries of the run directory into a new folder `.overwritten/<time>-<n>/`; deletes nothing."""
    if not entries:
        return None
    base = Path(run_dir) / ASIDE
    base.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        dest = base / f"{stamp}-{n}"
        try:
            dest.mkdir()
            break
        except FileExistsError:
            continue
    for p in entries:
        p.rename(dest / p.name)
    return dest


def retire_run(run_dir: str | os.PathLike) -> Path | None:
    """overwrite_output_dir without resume: the previous run, all of it (checkpoints, weights, logs, summary), moves
    aside, so resume=auto never mixes two runs, nor memory.jsonl two runs' records, and nothing is deleted."""
    return set_aside(run_dir, run_content(run_dir))


def retire_after(run_dir: str | os.PathLike, resume: str | os.PathLike) -> Path | None:
    """Resuming from `resume`: if the run directory holds a trajectory that went on past it (later checkpoints, or
    a run that ended at a later step, e.g. diverged), that trajectory moves aside (its later checkpoints, logs and
    outputs), so that resume=auto never picks it up again and the new logs start clean. Checkpoints up to the
    resume point stay."""
    run = Path(run_dir)
    if not _inside(resume, run):  # another folder's checkpoint: none of this run's trajectory continues
        return retire_run(run)
    step = checkpoint_step(Path(resume))
    try:
        ended = int(json.loads((run / SUMMARY).read_text()).get("step") or 0)
    except (OSError, ValueError, AttributeError, TypeError):
        ended = 0
    keep = Path(resume).resolve()
    gone_on = [p for p in run_content(run) if p.resolve() != keep and (step_of(p) is None or step_of(p) > step)]
    if ended <= step and all(step_of(p) is None for p in gone_on):
        return None
    return set_aside(run, gone_on)
