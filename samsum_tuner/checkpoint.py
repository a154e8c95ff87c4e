"""Checkpoints that are either complete or invisible, and the one rule for "the last complete checkpoint".

The Trainer writes `checkpoint-N` in place (transformers 5.24 `_save_checkpoint`), so a save killed halfway
leaves a folder that `get_last_checkpoint` picks up. Here every rank writes into `.partial/checkpoint-N`,
and rank 0 renames it into the run directory once all ranks are done: a rename is atomic on one filesystem.
The Trainer path (`SamsumTrainer`) and the plain FSDP2 path (`save_sharded`/`load_sharded`) share it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import ConfigError

PREFIX = "checkpoint"
STAGING = ".partial"  # not `checkpoint-*`: neither the Trainer's glob nor ours ever sees a half-written save
TRASH = ".trash"
STATE_FILE = "trainer_state.json"  # the Trainer writes it last; our FSDP2 path does the same
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


def _fsync_tree(path: Path) -> None:
    # The rename is the commit: the files it publishes must be on disk before it.
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


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


def staging_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / STAGING / f"{PREFIX}-{step}"


@contextmanager
def atomic_checkpoint(run_dir: str | os.PathLike, step: int, *, is_main: bool = True,
                      barrier: Callable[[], None] = lambda: None) -> Iterator[Path]:
    """Yield the staging folder every rank writes into; on success rank 0 publishes it as checkpoint-N.

    Same staging path on every rank (ranks write their shards into one folder). An exception leaves
    the staging folder where it is: resume never looks there, and the next save at that step clears it.
    """
    run = Path(run_dir)
    stage = staging_dir(run, step)
    if is_main:  # whatever a killed save left in staging is garbage
        shutil.rmtree(stage.parent, ignore_errors=True)
        stage.mkdir(parents=True)
    barrier()
    yield stage
    barrier()  # every rank has written its part
    if is_main:
        final = run / stage.name
        _fsync_tree(stage)
        if final.exists():  # a resumed run saving a step it had saved before it was killed
            _discard(final, run)
        stage.rename(final)
        _fsync_dir(run)
        shutil.rmtree(run / TRASH, ignore_errors=True)
        shutil.rmtree(stage.parent, ignore_errors=True)
    barrier()


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


# ---------------------------------------------------------------- resume and the run directory
def resolve_resume(value: str | None, run_dir: str | os.PathLike) -> Path | None:
    """`train.resume_from_checkpoint`: None, "auto" (the last complete checkpoint, or a fresh start) or a path."""
    if value is None:
        return None
    if value == "auto":
        return latest_checkpoint(run_dir)
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ConfigError(f"train.resume_from_checkpoint: {path} does not exist")
    if not is_complete(path):
        latest = latest_checkpoint(path) or latest_checkpoint(run_dir)
        hint = f"; the last complete one is {latest}" if latest else ""
        raise ConfigError(f"train.resume_from_checkpoint: {path} is not a complete checkpoint "
                          f"(a checkpoint-N folder with {STATE_FILE}){hint}")
    return path


def check_output_dir(run_dir: str | os.PathLike, *, overwrite: bool, resume: str | None) -> None:
    """A run directory is written into only when asked: by resuming it, or by overwrite_output_dir."""
    out = Path(run_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir: {out} exists and is not a folder")
    if resume is not None:
        resolve_resume(resume, out)  # a bad path is refused now, before any model loads
        return
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        hint = " or resume=auto to continue it" if latest_checkpoint(out) else ""
        raise ConfigError(f"train.output_dir: {out} already holds a run; choose another folder, set "
                          f"train.overwrite_output_dir=true{hint}")


RUN_LOGS = ("memory.jsonl",)


def retire_checkpoints(run_dir: str | os.PathLike) -> Path | None:
    """overwrite_output_dir without resume: the previous run's checkpoints and its memory log (appended to by
    every epoch, so a new run would add to the old one's records) move to `.overwritten/` (replacing an older
    one), so resume=auto never mixes two runs and nothing is deleted on the way in."""
    run = Path(run_dir)
    old = [p for p in run.iterdir() if step_of(p) is not None or p.name in RUN_LOGS] if run.is_dir() else []
    if not old:
        return None
    aside = run / ".overwritten"
    if aside.exists():
        shutil.rmtree(aside)
    aside.mkdir()
    for p in old:
        p.rename(aside / p.name)
    return aside


# ---------------------------------------------------------------- sharded (FSDP2) checkpoints
def save_sharded(run_dir: str | os.PathLike, step: int, model, optimizer, *, extra: dict[str, Any] | None = None,
                 keep: int | None = None) -> Path:
    """Model and optimizer shards through torch.distributed.checkpoint, RNG per rank, atomically published.

    Collective: every rank calls it. Nothing is pickled: DCP writes tensors and plain containers, RNG
    states are tensors (`torch.save` of tensors, read back with `weights_only=True`).
    """
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = dist.get_rank() if dist.is_initialized() else 0
    barrier = dist.barrier if dist.is_initialized() else (lambda: None)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with atomic_checkpoint(run_dir, step, is_main=rank == 0, barrier=barrier) as stage:
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(stage / "sharded"))
        torch.save(_rng_state(), stage / f"rng_state_{rank}.pth")
        if rank == 0:
            (stage / STATE_FILE).write_text(json.dumps({"global_step": step, **(extra or {})}))
    final = Path(run_dir) / f"{PREFIX}-{step}"
    if rank == 0:
        rotate(run_dir, keep)
    barrier()
    return final


def load_sharded(checkpoint: str | os.PathLike, model, optimizer) -> dict[str, Any]:
    """The inverse of `save_sharded`; returns the state file's contents (global_step and extras)."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(checkpoint)
    if not is_complete(path):
        raise ConfigError(f"{path}: not a complete checkpoint")
    rank = dist.get_rank() if dist.is_initialized() else 0
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(path / "sharded"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    _set_rng_state(torch.load(path / f"rng_state_{rank}.pth", weights_only=True))
    return json.loads((path / STATE_FILE).read_text())


def _rng_state() -> dict[str, Any]:
    import torch

    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
