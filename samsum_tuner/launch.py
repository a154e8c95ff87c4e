"""Who launched us and how the run is distributed: one source of truth.

Under `accelerate launch` the accelerate config decides processes and FSDP settings, and a recipe
that contradicts it is refused. Under `torchrun` (the original's launch) the recipe's `fsdp.*` decides.
Activation checkpointing is the recipe's either way (Recipe.checkpoints_activations).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .config import FsdpConfig
from .errors import ConfigError


@dataclass
class Launch:
    launcher: str  # "python", "torchrun" or "accelerate"
    world_size: int
    rank: int
    local_rank: int
    fsdp: bool
    cpu_offload: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_bool(name: str) -> bool | None:
    v = os.environ.get(name)
    return None if v is None else v.strip().lower() in ("1", "true", "yes")


def _env_int(name: str, default: int, least: int) -> int:
    """A launcher's integer variable; a broken one is refused naming it (int() would raise a traceback)."""
    v = os.environ.get(name)
    if v is None:
        return default
    try:
        n = int(v)
    except ValueError:
        n = least - 1
    if n < least:
        raise ConfigError(f"environment variable {name}={v!r}: expected an integer >= {least}")
    return n


def detect_launch(fsdp_config: FsdpConfig) -> Launch:
    world = _env_int("WORLD_SIZE", 1, least=1)
    rank = _env_int("RANK", 0, least=0)
    local_rank = _env_int("LOCAL_RANK", 0, least=0)
    # `accelerate launch` exports its config as ACCELERATE_* variables (also for one process).
    if any(k in os.environ for k in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_CPU")):
        fsdp = bool(_env_bool("ACCELERATE_USE_FSDP"))
        offload = bool(_env_bool("FSDP_OFFLOAD_PARAMS"))
        version = _env_int("FSDP_VERSION", 1, least=1) if fsdp else fsdp_config.version
        conflicts = []
        if fsdp_config.enabled != fsdp:
            conflicts.append(f"recipe fsdp.enabled={str(fsdp_config.enabled).lower()} but the accelerate config "
                             f"{'uses' if fsdp else 'does not use'} FSDP")
        if fsdp and fsdp_config.cpu_offload != offload:
            conflicts.append(f"recipe fsdp.cpu_offload={str(fsdp_config.cpu_offload).lower()} but the accelerate "
                             f"config has fsdp_offload_params: {str(offload).lower()}")
        if fsdp and fsdp_config.version != version:
            conflicts.append(f"recipe fsdp.version={fsdp_config.version} but the accelerate config has "
                             f"fsdp_version: {version}")
        if fsdp and _env_bool("FSDP_ACTIVATION_CHECKPOINTING"):
            # accelerate's wrapper redraws dropout masks in the recompute and renames the decoder layers, under which
            # peft saves an empty adapter; transformers checkpoints the same layers without either (trainer.py).
            conflicts.append("the accelerate config has fsdp_activation_checkpointing: true, but activation "
                             "checkpointing is the recipe's model.gradient_checkpointing (on under FSDP unless false)")
        if conflicts:
            raise ConfigError("; ".join(conflicts) + ": change the recipe or pick the matching "
                              "accelerate_configs/ file")
        return Launch("accelerate", world, rank, local_rank, fsdp, offload)
    launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ or world > 1 else "python"
    return Launch(launcher, world, rank, local_rank, fsdp_config.enabled, fsdp_config.cpu_offload)
