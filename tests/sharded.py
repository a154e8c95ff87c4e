"""Sharded (FSDP2) checkpoints for a plain training loop, through samsum_tuner.checkpoint's atomic publication.

Used by tests/fsdp2_worker.py: it shows that `atomic_checkpoint`, `rotate` and `unusable` serve a loop without the
Trainer too. The layout (`sharded/` for model and optimizer, `rng_state_<rank>.pth`, trainer_state.json) is the one
`resume._missing` recognizes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from samsum_tuner.checkpoint import STATE_FILE, atomic_checkpoint, checkpoint_dir, rotate, worst_over_processes
from samsum_tuner.resume import unusable
from samsum_tuner.errors import ConfigError


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
    with atomic_checkpoint(run_dir, step, is_main=rank == 0, worst=worst_over_processes) as stage:
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(stage / "sharded"))
        torch.save(_rng_state(), stage / f"rng_state_{rank}.pth")
        if rank == 0:
            (stage / STATE_FILE).write_text(json.dumps({"global_step": step, **(extra or {})}))
    final = checkpoint_dir(run_dir, step)
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
    why = unusable(path)
    if why:
        raise ConfigError(f"{path} {why}")
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
