"""Who launched us and how the run is distributed: one source of truth.

Under `accelerate launch` the accelerate config decides processes and FSDP settings, and a recipe
that contradicts it is refused. Under `torchrun` (the original's launch) the recipe's `fsdp.*` decides.
Activation checkpointing is the recipe's either way (Recipe.checkpoints_activations).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .config import Recipe
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


def detect_launch(recipe: Recipe) -> Launch:
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    # `accelerate launch` exports its config as ACCELERATE_* variables (also for one process).
    if any(k in os.environ for k in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_CPU")):
        fsdp = bool(_env_bool("ACCELERATE_USE_FSDP"))
        offload = bool(_env_bool("FSDP_OFFLOAD_PARAMS"))
        version = int(os.environ.get("FSDP_VERSION", 1)) if fsdp else recipe.fsdp.version
        conflicts = []
        if recipe.fsdp.enabled != fsdp:
            conflicts.append(f"recipe fsdp.enabled={str(recipe.fsdp.enabled).lower()} but the accelerate config "
                             f"{'uses' if fsdp else 'does not use'} FSDP")
        if fsdp and recipe.fsdp.cpu_offload != offload:
            conflicts.append(f"recipe fsdp.cpu_offload={str(recipe.fsdp.cpu_offload).lower()} but the accelerate "
                             f"config has fsdp_offload_params: {str(offload).lower()}")
        if fsdp and recipe.fsdp.version != version:
            conflicts.append(f"recipe fsdp.version={recipe.fsdp.version} but the accelerate config has "
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
    return Launch(launcher, world, rank, local_rank, recipe.fsdp.enabled, recipe.fsdp.cpu_offload)


def check_environment(recipe: Recipe, launch: Launch) -> None:
    """What this machine cannot do, refused before anything is loaded."""
    cuda = torch.cuda.is_available()
    if recipe.train.fp16 and not cuda:
        raise ConfigError("refused: train.fp16 (the original's --use_fp16) needs a CUDA GPU; this machine has "
                          "none: use fp32 (train.fp16=false) on CPU")
    if recipe.model.attn_implementation == "flex_attention" and not cuda:
        raise ConfigError("refused: model.attn_implementation=flex_attention trains on a CUDA GPU only (torch's "
                          "FlexAttention has no backward on CPU): use model.attn_implementation=sdpa, which "
                          "keeps packed samples apart too")
    if launch.fsdp and not cuda:
        raise ConfigError("refused: FSDP needs CUDA GPUs (accelerate does not engage FSDP on CPU); drop "
                          "fsdp.enabled / --enable_fsdp to train on CPU")
    if recipe.train.eval_rouge_rows > 0 and launch.world_size > 1:
        # Generation would run on every rank in lockstep through sharded layers; not supported yet.
        raise ConfigError("refused: train.eval_rouge_rows needs a single process; score the saved run with "
                          "samsum-tuner eval instead")
    if launch.fsdp and launch.launcher == "python":
        raise ConfigError("refused: fsdp.enabled needs a distributed launch: torchrun --nproc_per_node N -m "
                          "samsum_tuner.train ... or accelerate launch --config_file accelerate_configs/fsdp4.yaml")
