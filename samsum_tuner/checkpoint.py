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

import yaml

from .errors import ConfigError, DiskFull

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


# ---------------------------------------------------------------- what resume needs, and which checkpoint
# The Trainer's checkpoint: weights (LoRA adapter, full safetensors, or FSDP's sharded folder), optimizer (a file,
# FSDP's full optimizer.bin or its sharded folder), scheduler, RNG (one file, or one per process), trainer state.
# A plain FSDP2 loop's layout (tests/sharded.py) holds `sharded/` (model and optimizer) and RNG per process.
FSDP_WEIGHTS, FSDP_OPTIMIZER = "pytorch_model_fsdp", "optimizer_"


def _names(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def _missing(path: Path, lora: bool | None) -> str | None:
    """The first piece of state resume needs that the checkpoint lacks (lora: the run kind; None: either)."""
    names = _names(path)
    fsdp = any(n.startswith(FSDP_WEIGHTS) for n in names)
    if "sharded" in names:  # a plain FSDP2 loop's layout: model and optimizer shards in one DCP folder
        return None if any(n.startswith("rng_state") for n in names) else "rng_state_<rank>.pth"
    adapter = {"adapter_model.safetensors", "adapter_config.json"} <= names
    full = bool(names & {"model.safetensors", "model.safetensors.index.json"})
    if not (fsdp or (adapter if lora else full if lora is False else adapter or full)):
        return ("adapter_model.safetensors and adapter_config.json (the LoRA adapter)" if lora
                else "model.safetensors (the weights)" if lora is False
                else "the weights (adapter_model.safetensors and adapter_config.json, or model.safetensors)")
    if lora and fsdp and "adapter_config.json" not in names:
        return "adapter_config.json"
    if not ({"optimizer.pt", "optimizer.bin"} & names or any(n.startswith(FSDP_OPTIMIZER) for n in names)):
        return "optimizer.pt (the optimizer state)"
    if "scheduler.pt" not in names:
        return "scheduler.pt (the learning-rate schedule)"
    if not any(n.startswith("rng_state") for n in names):
        return "rng_state.pth (the random number generators)"
    return None


def _read_by_resume(name: str) -> bool:
    """Files the Trainer reads on resume (the tokenizer and a pickled training_args.bin it never reads)."""
    return (name in (STATE_FILE, "adapter_config.json", "config.json", "model.safetensors.index.json", "scheduler.pt",
                     "scaler.pt") or name.endswith(".safetensors") or name.startswith(("optimizer", "rng_state"))
            or (name.startswith(FSDP_WEIGHTS) and name.endswith(".bin")))


def _unreadable(file: Path) -> str | None:
    """Why one file of training state cannot be read, or None. Tensors are mapped, not read: a large optimizer
    state costs its zip directory and pickle, not its size in memory (docs/notes.md)."""
    from transformers.trainer_pt_utils import safe_globals  # numpy arrays and dtypes of the RNG state: data, not code

    try:
        if file.suffix == ".json":
            json.loads(file.read_text(encoding="utf-8"))
        elif file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), "pt") as f:
                f.keys()
        else:
            import torch

            with safe_globals():
                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - whatever the reader says, resume cannot use the file
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return f"an unreadable {file.name} ({type(e).__name__}: {first})"
    return None


def unusable(path: str | os.PathLike, lora: bool | None = None) -> str | None:
    """Why resume cannot use all of this checkpoint, or None: published (trainer_state.json), every file of its
    manifest there at its size, every piece of state present (for the run kind `lora`, None: either), and each
    file resume reads readable."""
    p = Path(path)
    if not is_complete(p):
        return f"is not a complete checkpoint (a {PREFIX}-N folder with {STATE_FILE})"
    if (p / MANIFEST).is_file():
        try:
            files = json.loads((p / MANIFEST).read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return f"has an unreadable {MANIFEST}"
        for name, size in files.items():
            f = p / name
            if not f.is_file():
                return f"misses {name}"
            if f.stat().st_size != size:
                return f"has {name} at {f.stat().st_size} bytes, saved with {size}"
    missing = _missing(p, lora)
    if missing:
        return f"misses {missing}"
    for f in sorted(p.iterdir()):
        if f.is_file() and _read_by_resume(f.name):
            why = _unreadable(f)
            if why:
                return f"has {why}"
    return None


# Settings that make a checkpoint another model or another optimizer: a resume with different ones is refused.
IDENTITY = ("lora.enabled", "lora.r", "lora.alpha", "lora.target_modules", "quantization.bits",
            "quantization.quant_type", "train.optim")


_ABSENT = object()


def _setting(recipe: dict, key: str):
    section, name = key.split(".")
    if name not in (recipe.get(section) or {}):
        return _ABSENT
    value = recipe[section][name]
    return sorted(value) if isinstance(value, list) else value


def saved_recipe(path: str | os.PathLike) -> dict | None:
    """The recipe a checkpoint was saved with (ours write it there), or None."""
    f = Path(path) / RECIPE_FILE
    try:
        found = yaml.safe_load(f.read_text(encoding="utf-8")) if f.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return found if isinstance(found, dict) else None


def _optimizer_kind(optim: str | None) -> str | None:
    return "sgd" if optim == "sgd" else "adamw" if optim and "adam" in optim else None


def _inferred_recipe(path: Path) -> dict:
    """What a checkpoint written by another tool shows of its recipe: the adapter's config, the optimizer kind."""
    lora: dict = {}
    adapter = path / "adapter_config.json"
    if not any(n.startswith(FSDP_WEIGHTS) for n in _names(path)):
        lora["enabled"] = adapter.is_file()
    if adapter.is_file():
        cfg = json.loads(adapter.read_text())
        lora.update(r=cfg.get("r"), alpha=cfg.get("lora_alpha"), target_modules=cfg.get("target_modules"))
    kind = None
    if (path / "optimizer.pt").is_file():
        import torch

        groups = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True, mmap=True)["param_groups"]
        kind = ("adamw" if groups and "betas" in groups[0] else "sgd" if groups and "momentum" in groups[0]
                else None)
    return {"lora": lora, "train": {"optim": kind} if kind else {}}


def check_recipe(path: str | os.PathLike, recipe) -> None:
    """Refuse a checkpoint saved with another model or optimizer than `recipe` has, naming the setting."""
    p = Path(path)
    current, saved = recipe.to_dict(), saved_recipe(p)
    if saved is None:  # another tool's optimizer names are not ours: compare the kind only
        saved = _inferred_recipe(p)
        current["train"]["optim"] = _optimizer_kind(current["train"]["optim"]) or _ABSENT
    for key in IDENTITY:
        was, now = _setting(saved, key), _setting(current, key)
        adapter_only = key.startswith("lora.") and key != "lora.enabled"
        if _ABSENT in (was, now) or (adapter_only and not current["lora"]["enabled"]):
            continue
        if was != now:
            raise ConfigError(f"train.resume_from_checkpoint: {p} was saved with {key}={was}, this run has "
                              f"{key}={now}: resume with the same {key}, or start a new run (another "
                              "train.output_dir, or train.overwrite_output_dir=true)")


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint was saved at: its name, else its state file."""
    step = step_of(path)
    if step is None:
        step = int(json.loads((path / STATE_FILE).read_text()).get("global_step", 0))
    return step


def diverged_at(run_dir: str | os.PathLike) -> tuple[bool, str | None]:
    """(whether the run's last training stopped on the NaN guard, the checkpoint the guard named)."""
    try:
        summary = json.loads((Path(run_dir) / SUMMARY).read_text())
    except (OSError, ValueError):
        return False, None
    if not isinstance(summary, dict) or summary.get("status") != "diverged":
        return False, None
    good = summary.get("last_good_checkpoint")
    return True, Path(good).name if good else None


def _problem(path: Path, recipe) -> str | None:
    """Why resume cannot use this checkpoint for `recipe` (None: any run), or None; a checkpoint of another
    model or optimizer is refused outright (ConfigError), since every checkpoint of its run shares that."""
    why = unusable(path)
    if why is None and recipe is not None:
        check_recipe(path, recipe)
        missing = _missing(path, recipe.lora.enabled)
        why = f"misses {missing}" if missing else None
    return why


def resolve_resume(value: str | None, run_dir: str | os.PathLike, recipe=None,
                   notes: list[str] | None = None) -> Path | None:
    """`train.resume_from_checkpoint`: None, "auto" or a path; the checkpoint to resume, or None (auto: nothing
    usable). Auto takes the newest checkpoint resume can use all of, skipping others with a note, and after a
    divergence the one the NaN guard named. A path that cannot be used is refused naming why."""
    notes = notes if notes is not None else []
    if value is None:
        return None
    run = Path(run_dir)
    if value == "auto":
        found = complete_checkpoints(run)
        diverged, good = diverged_at(run)
        if diverged and good is not None and step_of(good) is not None:
            newer = [p.name for p in found if step_of(p) > step_of(good)]
            found = [p for p in found if step_of(p) <= step_of(good)]
            if newer:
                notes.append(f"the last run diverged: resuming from the checkpoint the NaN guard named, {good}, not "
                             f"the newer {', '.join(newer)}")
        elif diverged:
            found = []
            notes.append("the last run diverged before any good checkpoint was saved")
        for path in reversed(found):
            why = _problem(path, recipe)
            if why is None:
                return path
            notes.append(f"skipping {path}: it {why}")
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ConfigError(f"train.resume_from_checkpoint: {path} does not exist")
    why = _problem(path, recipe)
    if why:
        usable = [p for d in (path, run) for p in reversed(complete_checkpoints(d)) if unusable(p) is None]
        hint = f"; the last complete one is {usable[0]}" if usable else ""
        raise ConfigError(f"train.resume_from_checkpoint: {path} {why}{hint}")
    return path
