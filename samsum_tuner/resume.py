"""What resume needs of a checkpoint, and which checkpoint a run resumes from: the files it must hold, whether it
was saved with this recipe's model and optimizer, and `resume=auto`'s choice."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from .checkpoint import (MANIFEST, PREFIX, RECIPE_FILE, STATE_FILE, SUMMARY, complete_checkpoints, is_complete,
                         step_of)
from .errors import ConfigError, brief
from .yaml_io import read_yaml

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

    found = None
    try:
        if file.suffix == ".json":
            found = json.loads(file.read_text(encoding="utf-8"))
        elif file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), "pt") as f:
                f.keys()
        else:
            import torch

            with safe_globals():
                found = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - whatever the reader says, resume cannot use the file
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return f"an unreadable {file.name} ({type(e).__name__}: {first})"
    # What another writer's checkpoint is read for (_inferred_recipe): a JSON object, an optimizer's param groups
    if file.suffix == ".json" and not isinstance(found, dict):
        return f"an unreadable {file.name} (a JSON {type(found).__name__}, not an object)"
    if file.name == STATE_FILE and not (file.parent / "sharded").is_dir():  # a plain FSDP2 loop reads its own
        why = _state_problem(found)
        return f"an unreadable {file.name} ({why})" if why else None
    if file.name == "optimizer.pt" and not (isinstance(found, dict) and isinstance(found.get("param_groups"), list)
                                            and all(isinstance(g, dict) for g in found["param_groups"])):
        return f"an unreadable {file.name} (no list of param_groups)"
    return None


def _state_problem(state: dict) -> str | None:
    """What the Trainer's resume cannot take of trainer_state.json, or None: TrainerState(**state) takes its own
    keys only; resuming computes with global_step (the data skip) and train_batch_size (compared with this run's
    batch), and the next save updates stateful_callbacks' TrainerControl entry (a TypeError or KeyError if absent)."""
    import dataclasses

    from transformers.trainer_callback import TrainerState

    unknown = sorted(set(state) - {f.name for f in dataclasses.fields(TrainerState)})
    if unknown:
        return f"an unknown key {unknown[0]!r}"
    for key, least in (("global_step", 0), ("train_batch_size", 1)):
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            kind = "a positive" if least else "a non-negative"
            return f"'{key}' must be {kind} integer, got {brief(value) if key in state else 'none'}"
    for key, kind in (("log_history", list), ("stateful_callbacks", dict), ("best_model_checkpoint", str)):
        if state.get(key) is not None and not isinstance(state[key], kind):
            return f"'{key}' must be {'an array' if kind is list else 'an object' if kind is dict else 'a path'}"
    if not all(isinstance(h, dict) for h in state.get("log_history") or []):
        return "'log_history' must hold objects"
    if "TrainerControl" not in (state.get("stateful_callbacks") or {}):
        return "'stateful_callbacks' has no TrainerControl"
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
    why = _read_recipe(p)[1]
    return f"has {why}" if why else None


# Settings that make a checkpoint another model or another optimizer: a resume with different ones is refused.
IDENTITY = ("lora.enabled", "lora.r", "lora.alpha", "lora.target_modules", "quantization.bits",
            "quantization.quant_type", "train.optim")


_ABSENT = object()


def _setting(settings: dict, key: str):
    section, name = key.split(".")
    if name not in (settings.get(section) or {}):
        return _ABSENT
    value = settings[section][name]
    return sorted(value, key=repr) if isinstance(value, list) else value  # any items: a damaged list compares too


def _read_recipe(path: Path) -> tuple[dict | None, str | None]:
    """(the recipe a checkpoint was saved with, or None; why its recipe.yaml cannot be read, or None). The
    sections compared at resume must be mappings: a damaged file is named rather than compared."""
    f = path / RECIPE_FILE
    if not f.is_file():
        return None, None
    try:
        found = read_yaml(f)
    except ConfigError as e:  # invalid YAML, not UTF-8, an integer too long for Python, not a mapping
        return None, f"an unreadable {RECIPE_FILE}{str(e).removeprefix(str(f))}"
    for section in dict.fromkeys(key.split(".")[0] for key in IDENTITY):
        if not isinstance(found.get(section) or {}, dict):
            return None, f"an unreadable {RECIPE_FILE} ('{section}' must be a mapping, got {brief(found[section])})"
    return found or None, None


def saved_recipe(path: str | os.PathLike) -> dict | None:
    """The recipe a checkpoint was saved with (ours write it there), or None (none, or unreadable: unusable names
    it)."""
    return _read_recipe(Path(path))[0]


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


def check_recipe(path: str | os.PathLike, settings: dict) -> None:
    """Refuse a checkpoint saved with another model or optimizer than the recipe's `settings` (Recipe.to_dict()) say,
    naming the setting."""
    p = Path(path)
    current, saved = copy.deepcopy(settings), saved_recipe(p)  # the caller checks the next checkpoint with it
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
    if good is not None and not isinstance(good, str):  # a damaged summary: which checkpoint is good is unknown
        raise ConfigError(f"{Path(run_dir) / SUMMARY}: 'last_good_checkpoint' must be a checkpoint path or null, got "
                          f"{brief(good)}: resume a checkpoint by its path (train.resume_from_checkpoint=PATH)")
    return True, Path(good).name if good else None


def _problem(path: Path, settings: dict | None) -> str | None:
    """Why resume cannot use this checkpoint for the recipe's `settings` (None: any run), or None; a checkpoint of
    another model or optimizer is refused outright (ConfigError), since every checkpoint of its run shares that."""
    why = unusable(path)
    if why is None and settings is not None:
        check_recipe(path, settings)
        missing = _missing(path, settings["lora"]["enabled"])
        why = f"misses {missing}" if missing else None
    return why


def resolve_resume(value: str | None, run_dir: str | os.PathLike, settings: dict | None = None,
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
            why = _problem(path, settings)
            if why is None:
                return path
            notes.append(f"skipping {path}: it {why}")
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ConfigError(f"train.resume_from_checkpoint: {path} does not exist")
    why = _problem(path, settings)
    if why:
        usable = [p for d in (path, run) for p in reversed(complete_checkpoints(d)) if unusable(p) is None]
        hint = f"; the last complete one is {usable[0]}" if usable else ""
        raise ConfigError(f"train.resume_from_checkpoint: {path} {why}{hint}")
    return path
