"""The recipe, resolved once into the objects that run it: TrainingArguments (with the launch's FSDP settings), the
model's load (BitsAndBytesConfig, peft's LoraConfig) and the batching. Modules below this one take these objects or
their own section of the recipe, never the Recipe."""
from __future__ import annotations

from typing import Any

import torch
from transformers import TrainingArguments

from .batching import BatchingSpec
from .config import FsdpConfig, Recipe, TrainConfig
from .errors import ConfigError
from .launch import Launch
from .model import ModelLoad

# transformers renamed gradient_checkpointing to activation_checkpointing (the old name now warns); older releases
# have only the old one.
CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                 else "gradient_checkpointing")


def training_arguments(recipe: Recipe, launch: Launch, layer_cls: list[str], has_eval: bool) -> TrainConfig:
    """recipe.train completed with what the launch, the machine and the other sections decide: what the Trainer gets
    and training_args.json records."""
    t = recipe.train
    derived: dict[str, Any] = {
        "eval_strategy": t.eval_strategy if has_eval else "no",
        "eval_on_start": t.eval_on_start and has_eval and t.eval_strategy != "no",
        # Each decoder layer recomputed in backward (Recipe.checkpoints_activations), quantized models too (peft's
        # own switch goes through transformers' deprecated gradient_checkpointing_enable). Under FSDP, unlike
        # accelerate's wrapper, it replays the dropout masks and keeps the layer names peft saves adapters by.
        CHECKPOINTING: recipe.checkpoints_activations,
        f"{CHECKPOINTING}_kwargs": {"use_reentrant": False},
        "use_cpu": not torch.cuda.is_available(),
        "ddp_find_unused_parameters": False if launch.world_size > 1 and not launch.fsdp else None,
        # Batches come from pinned memory (the Trainer's default with CUDA): copied without blocking, the next
        # batch no longer waits for the previous optimizer step to finish on the GPU. Without CUDA nothing is
        # pinned, and non_blocking would only draw the Trainer's notice about pinning.
        "accelerator_config": {"non_blocking": True} if torch.cuda.is_available() else {},
    }
    if t.optim == "sgd":  # transformers' SGD takes its momentum from optim_args
        derived["optim_args"] = ",".join(filter(None, [t.optim_args, f"momentum={t.momentum}"]))
    if launch.fsdp and t.gradient_accumulation_steps > 1 and recipe.fsdp.reduce_every_micro_batch:
        derived["accelerator_config"]["gradient_accumulation_kwargs"] = {"sync_each_batch": True}
    derived.update(fsdp_arguments(recipe.fsdp, launch, layer_cls))
    try:
        args = t.completed(**derived)
    except (ValueError, TypeError) as e:  # a TrainingArguments field that its own checks refuse
        raise ConfigError("train: " + " ".join(line.strip() for line in str(e).strip().splitlines())) from None
    check_optimizer_and_schedule(args)
    return args


# Optimizers that transformers builds from the model itself (its layers' names), not from parameters alone.
NEEDS_THE_MODEL = ("galore", "apollo", "lomo")


def check_optimizer_and_schedule(args: TrainingArguments) -> None:
    """The Trainer builds its optimizer and schedule after the model has loaded: built here first, over one stand-in
    parameter, so that a value they refuse (betas, eps, optim_args, a scheduler's kwargs, a missing package) is one
    line before any loading, and before overwrite_output_dir moves anything."""
    from transformers import Trainer, get_scheduler

    if any(name in args.optim for name in NEEDS_THE_MODEL):
        return
    keys = "train.optim with its settings (optim_args, adam_*, weight_decay)"
    try:
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        optimizer = cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)
        if args.lr_scheduler_type != "steplr":  # ours, built by SamsumTrainer.create_scheduler
            keys = "train.lr_scheduler_type with its settings (lr_scheduler_kwargs, warmup_*)"
            get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(100),
                          num_training_steps=100, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    except (ValueError, TypeError, KeyError, ImportError, RuntimeError, AttributeError) as e:
        raise ConfigError(f"{keys}: {' '.join(str(e).split())}") from None


def fsdp_arguments(f: FsdpConfig, launch: Launch, layer_cls: list[str]) -> dict:
    """TrainingArguments FSDP fields for a torchrun launch; accelerate launches bring their own plugin."""
    if not launch.fsdp or launch.launcher == "accelerate":
        return {}
    options = ["full_shard" if f.sharding_strategy == "FULL_SHARD" else f.sharding_strategy.lower(), "auto_wrap"]
    if f.cpu_offload:
        options.append("offload")
    return {
        "fsdp": " ".join(options),
        "fsdp_config": {
            "version": f.version,
            "transformer_layer_cls_to_wrap": layer_cls,
            "reshard_after_forward": f.sharding_strategy == "FULL_SHARD",
            "state_dict_type": "SHARDED_STATE_DICT",
            # Rank 0 loads the checkpoint, the others start on meta: one host copy, not one per rank.
            "cpu_ram_efficient_loading": True,
        },
    }


def batching_spec(recipe: Recipe) -> BatchingSpec:
    """How the recipe's batches are formed and fed."""
    d = recipe.data
    # The recipe's attention name, which picks a packed row's mask: the model's config may spell it otherwise
    # (transformers drops a paged| prefix), and the model compute_loss gets may be wrapped (DDP, FSDP, PEFT).
    return BatchingSpec(max_tokens_per_batch=d.max_tokens_per_batch, packing=d.packing,
                        pad_to_multiple_of=d.pad_to_multiple_of, longest_first=d.longest_first,
                        supervised_logits_only=recipe.train.supervised_logits_only,
                        attn_implementation=recipe.model.attn_implementation)


DTYPES = {None: torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(recipe: Recipe) -> torch.dtype:
    """What the matmuls run in: fp16/bf16 under mixed precision, else the weights' own dtype."""
    t = recipe.train
    if t.fp16:
        return torch.float16
    if t.bf16:
        return torch.bfloat16
    return DTYPES[recipe.model.dtype]


def model_load(recipe: Recipe, *, fsdp: bool = False) -> ModelLoad:
    """How model.load_model loads the recipe's model; `fsdp`: the launch shards it."""
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    q, lo, cdtype = recipe.quantization, recipe.lora, compute_dtype(recipe)
    bnb = None
    if q.bits == 8:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    elif q.bits == 4:
        bnb = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=cdtype,
            # FSDP flattens parameters of one dtype: 4-bit storage must be the compute dtype (fsdp_qlora).
            bnb_4bit_quant_storage=cdtype if fsdp else torch.uint8)
    lora = LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=list(lo.target_modules),
                      bias=lo.bias, task_type="CAUSAL_LM") if lo.enabled else None
    return ModelLoad(recipe.model, cdtype if q.bits else DTYPES[recipe.model.dtype], bnb, lora,
                     lo.autocast_adapter_dtype, fsdp, recipe.memory.gpu_limit_gib)


def lora_targets(recipe: Recipe) -> list[str] | None:
    """The modules LoRA adapts, which the model must have; None: no LoRA."""
    return recipe.lora.target_modules if recipe.lora.enabled else None
