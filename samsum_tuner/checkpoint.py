"""Checkpoints that are either complete or invisible, and the one rule for "the last complete checkpoint".

The Trainer's `_save_checkpoint` writes `checkpoint-N` in place, so a save killed halfway leaves a folder that
`get_last_checkpoint` picks up. Here every rank writes into `.partial/checkpoint-N`, and rank 0 renames it into
the run directory once all ranks are done: a rename is atomic on one filesystem. `SamsumTrainer` saves through
it; so does the plain FSDP2 loop of the tests (tests/sharded.py).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


from .errors import DiskFull

PREFIX = "checkpoint"
STAGING = ".partial"  # not `checkpoint-*`: neither the Trainer's glob nor ours ever sees a half-written save
TRASH = ".trash"
STATE_FILE = "trainer_state.json"  # the Trainer writes it last; tests/sharded.py does the same
MANIFEST = "manifest.json"  # every file of a published checkpoint and its size, written at publication
RECIPE_FILE = "recipe.yaml"  # the resolved recipe: in the run directory, and in every checkpoint we save
SUMMARY = "run_summary.json"
_NAME = re.compile(rf"^{PREFIX}-(\d+)$")


def step_of(path: str | os.PathLike) -> int | None:
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete(path: str | os.PathLike) -> bool:
    p = Path(path)
    return step_of(p) is not None and p.is_dir() and (p / STATE_FILE).is_file()


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest step first. Folders left by an older, non-atomic writer without
    their state file are not complete and are never resumed from."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: step_of(p))  # type: ignore[arg-type,return-value]


def latest_checkpoint(run_dir: str | os.PathLike, before_step: int | None = None) -> Path | None:
    found = [p for p in complete_checkpoints(run_dir) if before_step is None or step_of(p) < before_step]
    return found[-1] if found else None


def _fsync_tree(path: Path) -> dict[str, int]:
    """Every file under `path` on disk (the rename is the commit: what it publishes must be there before it);
    returns their sizes by relative path, the checkpoint's manifest."""
    sizes = {}
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                sizes[os.path.relpath(os.path.join(root, name), path)] = os.fstat(fd).st_size
            finally:
                os.close(fd)
    _fsync_dir(path)
    return sizes


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(path: Path, run_dir: Path) -> None:
    """Out of sight in one rename, then deleted: a kill mid-delete never leaves a half checkpoint-N."""
    trash = run_dir / TRASH
    trash.mkdir(exist_ok=True)
    target = trash / f"{path.name}-{time.time_ns()}"
    path.rename(target)
    shutil.rmtree(target, ignore_errors=True)


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of `step` is published (the Trainer's own name for it)."""
    return Path(run_dir) / f"{PREFIX}-{step}"


def staging_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / STAGING / f"{PREFIX}-{step}"


FAILED, DISK_FULL = 1, 2  # how a save ended on a process; the worst over the processes decides for all


def is_disk_full(error: BaseException, path: str | os.PathLike | None = None) -> bool:
    """Whether a failed write ran out of space: ENOSPC/EDQUOT anywhere in the exception chain, or in the message of
    a library that drops the errno (safetensors); for torch.save's stream error, which carries neither, a
    filesystem under `path` with (almost) nothing left."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(m in str(seen) for m in ("No space left on device", "os error 28", "Disk quota exceeded")):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return path is not None and shutil.disk_usage(path).free < 2**20
    except OSError:
        return False


def _outcome(error: BaseException | None, path: Path) -> int:
    return 0 if error is None else DISK_FULL if is_disk_full(error, path) else FAILED


@contextmanager
def atomic_checkpoint(run_dir: str | os.PathLike, step: int, *, is_main: bool = True,
                      worst: Callable[[int], int] = lambda outcome: outcome) -> Iterator[Path]:
    """Yield the staging folder every rank writes into; on success rank 0 publishes it as checkpoint-N, with a
    manifest of its files and sizes.

    Same staging path on every rank (ranks write their shards into one folder). `worst(outcome)` is the largest
    outcome over the processes, and a barrier (a collective: every rank calls it at the same points), so a save
    that fails on one rank fails on all. A failed save is removed from staging (a save killed outright stays
    there, where resume never looks, until the next save clears it); running out of space raises DiskFull.
    """
    run = Path(run_dir)
    stage = staging_dir(run, step)
    error: BaseException | None = None
    if is_main:  # whatever a killed save left in staging is garbage
        try:
            shutil.rmtree(stage.parent, ignore_errors=True)
            stage.mkdir(parents=True)
        except Exception as e:  # noqa: BLE001 - every rank must learn how the save went before any raises
            error = e
    if worst(_outcome(error, run)) == 0:
        try:
            yield stage
        except Exception as e:  # noqa: BLE001
            error = e
        if worst(_outcome(error, stage.parent)) == 0 and is_main:  # every rank has written its part
            try:
                _publish(stage, run)
            except Exception as e:  # noqa: BLE001
                error = e
    outcome = worst(_outcome(error, run))
    if is_main:
        shutil.rmtree(stage.parent, ignore_errors=True)
    if outcome == DISK_FULL:
        last = latest_checkpoint(run)
        raise DiskFull(f"no space left on the device of {run} while saving {PREFIX}-{step} "
                       f"({shutil.disk_usage(run).free / 2**20:.1f} MiB free): the half-written save was removed; "
                       f"the last complete checkpoint is {last or 'none'}; free some space and run again with "
                       "resume=auto") from None
    if error is not None:
        raise error
    if outcome:
        raise RuntimeError(f"saving {PREFIX}-{step} failed on another process")


def _publish(stage: Path, run: Path) -> None:
    files = _fsync_tree(stage)
    manifest = stage / MANIFEST
    manifest.write_text(json.dumps({"files": files}, indent=1, sort_keys=True))
    fd = os.open(manifest, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    final = run / stage.name
    if final.exists():  # a resumed run saving a step it had saved before it was killed
        _discard(final, run)
    stage.rename(final)
    _fsync_dir(run)
    shutil.rmtree(run / TRASH, ignore_errors=True)


def worst_over_processes(outcome: int, device=None) -> int:
    """The largest `outcome` over the processes of the default group (a collective; `device` is the one their
    group communicates on, the CPU for gloo)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return outcome
    value = torch.tensor([outcome], device=device or "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def rotate(run_dir: str | os.PathLike, keep: int | None, protect: tuple[str | os.PathLike, ...] = ()) -> list[Path]:
    """Keep the `keep` newest complete checkpoints (and `protect`); never the newest complete one.

    Incomplete `checkpoint-N` folders are neither counted nor deleted: they may be someone's evidence.
    """
    if not keep or keep <= 0:
        return []
    run = Path(run_dir)
    done = complete_checkpoints(run)
    keepers = {p.resolve() for p in done[-keep:]} | {Path(p).resolve() for p in protect}
    removed = [p for p in done[:-1] if p.resolve() not in keepers]
    for p in removed:
        _discard(p, run)
    shutil.rmtree(run / TRASH, ignore_errors=True)
    return removed
