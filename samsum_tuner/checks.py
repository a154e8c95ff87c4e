"""Impossible or self-defeating recipes, refused in one line before anything is loaded."""
from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import os
import tempfile
import typing
from pathlib import Path

from .config import SECTIONS, TRAIN_DEFAULTS, ModelConfig, Recipe, TrainConfig, field_types
from .errors import ConfigError, brief as _brief
from .launch import Launch
from .varlen import VARLEN, available as varlen_available


MAX_WORKERS = 256  # data loader workers or tokenizing processes: far more than any machine puts to use
MAX_SEED = 2**32 - 1  # transformers.set_seed seeds numpy, whose seeds stop here
PATH_KEYS = ("model.name", "data.source", "train.output_dir", "train.resume_from_checkpoint")


def _one_of(value: str, valid: list[str], key: str, what: str) -> None:
    if value in valid:
        return
    close = difflib.get_close_matches(value, valid, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else f"choose one of {', '.join(valid)}"
    raise ConfigError(f"{key}: unknown {what} {_brief(value)}; {hint}")


# The names the defaults and the committed recipes use. Any other name is looked up in transformers' own lists,
# whose modules import peft and bitsandbytes: seconds, on a recipe that a later check may refuse anyway.
COMMON_NAMES = {"scheduler": {"steplr", "linear", "cosine", "constant"},
                "optimizer": {"sgd", "adamw_torch", "adamw_torch_fused"},
                "integration": {"tensorboard"}, "attention implementation": {"eager", "sdpa", "flex_attention", VARLEN}}


def _library_names(what: str) -> list[str]:
    if what == "scheduler":
        from transformers.trainer_utils import SchedulerType

        return ["steplr", *(s.value for s in SchedulerType)]  # steplr: the original's, built by SamsumTrainer
    if what == "optimizer":
        from transformers.training_args import OptimizerNames

        return ["sgd", *(o.value for o in OptimizerNames)]  # sgd: a real torch.optim.SGD, built by SamsumTrainer
    if what == "integration":
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        return list(INTEGRATION_TO_CALLBACK)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]


def _check_library_names(m: ModelConfig, t: TrainConfig) -> None:
    """Scheduler, optimizer, reporting and attention names as transformers knows them, plus ours."""
    names = [("train.lr_scheduler_type", "scheduler", t.lr_scheduler_type), ("train.optim", "optimizer", t.optim),
             ("model.attn_implementation", "attention implementation", m.attn_implementation.removeprefix("paged|"))]
    if t.report_to not in (["all"], ["none"]):
        names += [("train.report_to", "integration", name) for name in t.report_to]
    for key, what, value in names:
        if value in COMMON_NAMES[what]:
            continue
        if what == "attention implementation":  # transformers drops the old paged| prefix itself (above)
            from transformers.integrations.hub_kernels import is_kernel

            if is_kernel(value):  # org/repo[:function]: an attention kernel from the hub, which transformers loads
                continue
        _one_of(value, _library_names(what), key, what)


def _check_path_text(key: str, value: str | None) -> None:
    """What no file system accepts, refused before any file is looked at."""
    if value is None:
        return
    if not value.strip():
        raise ConfigError(f"{key} is empty")
    if "\0" in value:
        raise ConfigError(f"{key}: a path cannot hold a NUL character")
    try:
        raw = os.fsencode(value)
    except UnicodeEncodeError:
        raise ConfigError(f"{key}: {_brief(value)} cannot be a file name (a lone surrogate)") from None
    if len(raw) >= 4096 or any(len(part) > 255 for part in raw.split(b"/")):
        raise ConfigError(f"{key}: path too long (at most 255 bytes a name, 4095 in all)")


def check_output_location(run_dir: str, what: str = "train.output_dir") -> None:
    """`what` (train.output_dir, a merge's target) can be created, or written if it exists: refused before the model
    loads, not at the first save."""
    path = Path(run_dir).expanduser().absolute()
    try:
        existing = path
        while not existing.exists():  # the nearest folder that is there
            existing = existing.parent
    except OSError as e:
        raise ConfigError(f"{what}: cannot look at {run_dir} ({e.strerror})") from None
    if not existing.is_dir():
        raise ConfigError(f"{what}: {existing} is a file, not a folder")
    if existing == path and not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: {path} is not writable")
    try:  # a folder made and removed where the run's will go: permissions, read-only mounts, /proc, for root too
        os.rmdir(tempfile.mkdtemp(prefix=".samsum-tuner-check-", dir=existing))
    except OSError as e:
        where = "write in" if existing == path else "create"
        raise ConfigError(f"{what}: cannot {where} {path} ({existing}: {e.strerror})") from None


def validate(recipe: Recipe) -> None:
    """Impossible or self-defeating combinations, refused before anything is loaded."""
    m, q, lo, d, t, f = recipe.model, recipe.quantization, recipe.lora, recipe.data, recipe.train, recipe.fsdp
    positive = {
        "train.per_device_train_batch_size": t.per_device_train_batch_size,
        "train.per_device_eval_batch_size": t.per_device_eval_batch_size,
        "train.gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train.learning_rate": t.learning_rate,
        "train.num_train_epochs": t.num_train_epochs,
        "train.logging_steps": t.logging_steps,
        "data.max_length": d.max_length,
        "data.pad_to_multiple_of": 1 if d.pad_to_multiple_of is None else d.pad_to_multiple_of,
        "lora.r": lo.r,
        "lora.alpha": lo.alpha,
        "memory.sample_interval_s": recipe.memory.sample_interval_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if d.max_tokens_per_batch is not None:
        multiple = d.pad_to_multiple_of or 1
        row = -(-d.max_length // multiple) * multiple  # the longest sample as the collator pads it
        if d.max_tokens_per_batch < row:
            padded = ("" if row == d.max_length
                      else f", padded to a multiple of data.pad_to_multiple_of ({multiple}): {row}")
            raise ConfigError(f"data.max_tokens_per_batch ({d.max_tokens_per_batch}) must be at least data.max_length "
                              f"({d.max_length}{padded}): the longest sample must fit a batch")
    if t.eval_rouge_rows < 0:
        raise ConfigError(f"train.eval_rouge_rows must be 0 (off) or positive, got {t.eval_rouge_rows}")
    if t.eval_rouge_rows and not d.eval_split:
        raise ConfigError("train.eval_rouge_rows needs an evaluation split (data.eval_split)")
    if m.attn_implementation == VARLEN and not d.packing:
        raise ConfigError(f"model.attn_implementation={VARLEN} attends within packed rows: set data.packing=true")
    if m.attn_implementation == VARLEN and t.eval_rouge_rows:
        raise ConfigError(f"train.eval_rouge_rows generates with a KV cache, which {VARLEN} (packed rows only) "
                          "cannot serve: set it to 0 and score the saved run with samsum-tuner eval")
    for key, value in {
        "memory.gpu_limit_gib": recipe.memory.gpu_limit_gib,
        "memory.gpu_memory_gib": recipe.memory.gpu_memory_gib,
        "memory.host_memory_gib": recipe.memory.host_memory_gib,
        "train.eval_steps": t.eval_steps,
        "train.save_steps": t.save_steps,
        "train.save_total_limit": t.save_total_limit,
    }.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    for section in SECTIONS:  # NaN passes every `<= 0` test below; an infinite size or rate is no setting
        for fld in dataclasses.fields(getattr(recipe, section)):
            v = getattr(getattr(recipe, section), fld.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{section}.{fld.name} must be a finite number, got {v}")
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 2**63 - 1:  # past every int64 count
                raise ConfigError(f"{section}.{fld.name} is out of range: {_brief(v)}")
    for key, value in {"guard.max_nonfinite_steps": recipe.guard.max_nonfinite_steps,
                       "guard.max_skipped_steps": recipe.guard.max_skipped_steps,
                       "train.warmup_steps": t.warmup_steps,
                       "train.dataloader_num_workers": t.dataloader_num_workers,
                       "memory.log_every_steps": recipe.memory.log_every_steps}.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if t.resume_from_checkpoint is not None and not t.resume_from_checkpoint.strip():
        raise ConfigError("train.resume_from_checkpoint: expected auto or a checkpoint folder, got ''")
    for key in PATH_KEYS:
        section, _, leaf = key.partition(".")
        _check_path_text(key, getattr(getattr(recipe, section), leaf))
    if not d.train_split.strip():
        raise ConfigError("data.train_split is empty")
    if not 0 <= t.seed <= MAX_SEED:
        raise ConfigError(f"train.seed must be in [0, 2**32 - 1], got {t.seed}")
    if t.dataloader_num_workers > MAX_WORKERS:
        raise ConfigError(f"train.dataloader_num_workers must be at most {MAX_WORKERS}, got {t.dataloader_num_workers}")
    if d.num_proc is not None and not 1 <= d.num_proc <= MAX_WORKERS:
        raise ConfigError(f"data.num_proc must be null or 1 to {MAX_WORKERS}, got {d.num_proc}")
    if lo.method != "lora":
        raise ConfigError(f"lora.method: only 'lora' is supported, got {_brief(lo.method)}")
    if lo.bias not in ("none", "all", "lora_only"):
        raise ConfigError(f"lora.bias must be none, all or lora_only (peft's choices), got {_brief(lo.bias)}")
    if not lo.target_modules or not all(name.strip() for name in lo.target_modules):
        raise ConfigError(f"lora.target_modules: name the modules to adapt (e.g. q_proj,v_proj), got "
                          f"{_brief(lo.target_modules)}")
    if not 0 <= lo.dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {lo.dropout}")
    if t.weight_decay < 0 or t.max_grad_norm < 0 or t.warmup_steps < 0 or t.momentum < 0:
        raise ConfigError("train.weight_decay, max_grad_norm, warmup_steps and momentum must be >= 0")
    if not 0 < t.gamma <= 1:
        raise ConfigError(f"train.gamma must be in (0, 1], got {t.gamma}")
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"train.max_steps must be positive or -1 (epochs decide), got {t.max_steps}")
    if m.dtype not in (None, "float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype must be float32, bfloat16 or float16, got {m.dtype!r}")
    if m.compile != "auto" and not isinstance(m.compile, bool):
        raise ConfigError(f"model.compile: expected true, false or auto, got {m.compile!r}")
    if m.compile_mode is not None:
        _one_of(m.compile_mode, COMPILE_MODES, "model.compile_mode", "mode")
        if m.compile is False:
            raise ConfigError("model.compile_mode applies to compiled layers: set model.compile=true or auto")
    _one_of(m.compile_scope, COMPILE_SCOPES, "model.compile_scope", "scope")
    if m.compile_scope == "model" and m.compile is not False:  # with compile off the scope has nothing to say
        if recipe.checkpoints_activations:
            raise ConfigError("refused: model.compile_scope=model with gradient checkpointing (recomputing a layer "
                              "inside a nested region): set model.compile_scope=layers")
        if t.eval_rouge_rows:
            raise ConfigError("refused: model.compile_scope=model with train.eval_rouge_rows (generation would compile "
                              "the whole model again at every new width): set model.compile_scope=layers")
    if q.bits not in (None, 4, 8):
        raise ConfigError(f"quantization.bits must be 4, 8 or null, got {q.bits!r}")
    if q.quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"quantization.quant_type must be nf4 or fp4, got {q.quant_type!r}")
    if "{dialog}" not in d.prompt_template:
        raise ConfigError("data.prompt_template must contain {dialog}")
    if t.eval_strategy not in ("no", "epoch", "steps") or t.save_strategy not in ("no", "epoch", "steps"):
        raise ConfigError("train.eval_strategy and train.save_strategy must be no, epoch or steps")
    if f.sharding_strategy not in ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"):
        raise ConfigError(f"fsdp.sharding_strategy: unknown strategy {f.sharding_strategy!r}")
    if f.version not in (1, 2):
        raise ConfigError(f"fsdp.version must be 1 or 2, got {f.version}")
    if t.fp16 and t.bf16:
        raise ConfigError("train.fp16 and train.bf16 are both set: choose one mixed precision")
    if m.dtype == "float16" and t.bf16 or m.dtype == "bfloat16" and t.fp16:
        raise ConfigError(f"model.dtype={m.dtype} contradicts train.{'bf16' if t.bf16 else 'fp16'}: pick one half type")
    if q.bits is not None and not lo.enabled:
        raise ConfigError(
            f"refused: full fine-tuning of a {q.bits}-bit quantized model cannot learn (quantized weights "
            "take no gradient: the original's flat loss in fp32, 'No inf checks were recorded for this "
            "optimizer' in fp16); enable LoRA (lora.enabled=true) or drop quantization"
        )
    if q.bits == 8 and f.enabled:
        raise ConfigError(
            "refused: 8-bit quantization cannot be sharded by FSDP (int8 weights are not flat-parameter "
            "compatible); use 4-bit (quantization.bits=4) with FSDP, or 8-bit on one GPU"
        )
    if f.cpu_offload and not f.enabled:
        raise ConfigError("refused: fsdp.cpu_offload needs FSDP (fsdp.enabled=true or an FSDP accelerate config)")
    if m.dtype == "float16" and not lo.enabled and t.optim != "sgd":
        # fp16 weights have no room for AdamW's small updates and no master copy to hold them.
        raise ConfigError(
            "refused: full fine-tuning with pure float16 weights underflows the updates; use train.fp16=true "
            "(fp32 master weights) or model.dtype=bfloat16"
        )
    if lo.enabled and not lo.autocast_adapter_dtype and m.dtype == "float16" and q.bits is None:
        # The adapters would be fp16 parameters: train.fp16's gradient scaler refuses to unscale them.
        raise ConfigError("refused: lora.autocast_adapter_dtype=false with model.dtype=float16 makes fp16 adapters, "
                          "whose updates underflow (and fp16 mixed precision refuses them); keep it true or use "
                          "model.dtype=bfloat16")
    if t.eval_strategy == "steps" and not t.eval_steps:
        raise ConfigError("train.eval_strategy=steps needs train.eval_steps")
    if t.save_strategy == "steps" and not t.save_steps:
        raise ConfigError("train.save_strategy=steps needs train.save_steps")
    _check_training_arguments(t)
    from .data import parse_slice  # the one parser of slice syntax

    for key, value in (("data.split_slice", d.split_slice), ("data.eval_slice", d.eval_slice)):
        if value is not None:
            parse_slice(value, key)
    _check_library_names(m, t)  # last: an unusual name imports transformers' trainer modules (seconds)


# TrainingArguments fields that samsum_tuner sets from one knob elsewhere: set here, they would be a second place.
DECIDED_ELSEWHERE = {
    "fsdp": "fsdp.enabled / fsdp.sharding_strategy / fsdp.cpu_offload (or the accelerate config)",
    "fsdp_config": "the fsdp section (or the accelerate config)",
    "use_cpu": "the machine (CUDA or not)",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "activation_checkpointing": "model.gradient_checkpointing",
    "gradient_checkpointing_kwargs": "model.gradient_checkpointing (non-reentrant)",
    "activation_checkpointing_kwargs": "model.gradient_checkpointing (non-reentrant)",
    # The Trainer would compile the whole model on top of model.compile's decoder layers.
    "torch_compile": "model.compile (each decoder layer compiled in place)",
    "torch_compile_backend": "model.compile (inductor)",
    "torch_compile_mode": "model.compile_mode",
    "deepspeed": "the fsdp section or an accelerate config (samsum_tuner shards with FSDP, not DeepSpeed)",
    "parallelism_config": "the fsdp section or an accelerate config",
}
COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_SCOPES = ["layers", "model"]
# What an evaluation with train.eval_rouge_rows adds (evaluation.score), each also as eval_<name>.
ROUGE_METRICS = ["rouge1", "rouge2", "rougeL", "rougeLsum", "ended_at_eos", "mean_new_tokens"]


def _check_training_arguments(t: TrainConfig) -> None:
    """What TrainingArguments would refuse only when the run starts, said now: its fields that samsum_tuner decides
    from another knob, and the choices of every Enum-typed field."""
    for name, where in DECIDED_ELSEWHERE.items():
        if hasattr(t, name) and getattr(t, name) != getattr(TRAIN_DEFAULTS, name):
            raise ConfigError(f"train.{name} is decided by {where}; set it there")
    for name in ("neftune_noise_alpha", "eval_accumulation_steps", "dataloader_prefetch_factor"):
        if getattr(t, name, None) is not None and getattr(t, name) <= 0:
            raise ConfigError(f"train.{name} must be positive or null, got {getattr(t, name)}")
    if t.label_names not in (None, ["labels"]):  # the collators and the loss read `labels` and nothing else
        raise ConfigError(f"train.label_names: the batches carry their targets as ['labels'], got {t.label_names}")
    if t.metric_for_best_model is not None:
        metric = t.metric_for_best_model.removeprefix("eval_")
        known = ["loss", "ppl"] + (ROUGE_METRICS if t.eval_rouge_rows else [])
        if metric == "ppl" and t.greater_is_better is not False:  # by its name it would count higher as better
            raise ConfigError(f"train.metric_for_best_model={t.metric_for_best_model} ranks as eval_loss does, lower "
                              "being better: use eval_loss, or set train.greater_is_better=false")
        if metric not in known:
            raise ConfigError(f"train.metric_for_best_model: no evaluation reports {t.metric_for_best_model!r}; "
                              f"one of {', '.join(known)}" + ("" if t.eval_rouge_rows else
                                                              " (the ROUGE scores with train.eval_rouge_rows)"))
    if t.optim == "sgd" and "momentum" in (t.optim_args or ""):
        raise ConfigError("train.optim_args: SGD's momentum is train.momentum; set it there")
    # Only TrainingArguments' own Enum-typed fields: ours (optim, lr_scheduler_type, the strategies) are plain str,
    # checked above and by _check_library_names.
    for name, typ in field_types(TrainConfig).items():
        value = getattr(t, name)
        choices = [a for a in typing.get_args(typ) or (typ,) if isinstance(a, type) and issubclass(a, enum.Enum)]
        if not choices or not isinstance(value, str):
            continue
        valid = [str(m.value) for m in choices[0]]
        if value not in valid:
            _one_of(value, valid, f"train.{name}", "choice")


def check_environment(recipe: Recipe, launch: Launch) -> None:
    """What this machine cannot do, refused before anything is loaded."""
    import torch

    cuda = torch.cuda.is_available()
    if recipe.train.fp16 and not cuda:
        raise ConfigError("refused: train.fp16 (the original's --use_fp16) needs a CUDA GPU; this machine has "
                          "none: use fp32 (train.fp16=false) on CPU")
    if recipe.model.attn_implementation == "flex_attention" and not cuda:
        raise ConfigError("refused: model.attn_implementation=flex_attention trains on a CUDA GPU only (torch's "
                          "FlexAttention has no backward on CPU): use model.attn_implementation=sdpa, which "
                          "keeps packed samples apart too")
    if recipe.model.attn_implementation == VARLEN and cuda:  # torch's FlashAttention (on a CPU: per-sample sdpa)
        if not varlen_available():
            raise ConfigError(f"refused: model.attn_implementation={VARLEN} needs torch >= 2.9 (its variable-length "
                              "FlashAttention): use flex_attention or sdpa")
        if torch.cuda.get_device_capability() < (8, 0):
            raise ConfigError(f"refused: model.attn_implementation={VARLEN} (FlashAttention) needs an Ampere or "
                              f"newer GPU; this one is {torch.cuda.get_device_name()}: use flex_attention or sdpa")
        if not (recipe.train.bf16 or recipe.train.fp16 or recipe.model.dtype in ("bfloat16", "float16")):
            raise ConfigError(f"refused: model.attn_implementation={VARLEN} (FlashAttention) computes in bf16 or "
                              "fp16: set train.bf16=true or model.dtype=bfloat16")
    if recipe.train.push_to_hub:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise ConfigError("refused: train.push_to_hub pushes the run to the hub, and HF_HUB_OFFLINE is set: unset "
                              "it, or push the run folder later (hf upload REPO RUN_DIR)")
    if recipe.train.use_liger_kernel and not _liger_available():
        raise ConfigError("refused: train.use_liger_kernel needs liger-kernel (pip install liger-kernel), which "
                          "runs its Triton kernels on a CUDA GPU")
    gpus = torch.cuda.device_count() if cuda else 0
    if gpus > 1 and launch.world_size == 1 and (recipe.data.packing or recipe.train.supervised_logits_only):
        # One process over several GPUs: the Trainer wraps the model in DataParallel, whose scatter splits every
        # tensor of a batch on its first dimension, the packed row's boundaries and supervised positions included.
        raise ConfigError(f"refused: one process sees {gpus} GPUs and the Trainer would split each batch over them "
                          "(DataParallel), cutting packed rows and supervised positions apart: launch one process "
                          f"per GPU (torchrun --nproc_per_node {gpus} -m samsum_tuner.train ...) or pick one GPU "
                          "(CUDA_VISIBLE_DEVICES=0)")
    if launch.fsdp and recipe.model.compile_scope == "model" and recipe.model.compile is not False:
        raise ConfigError("refused: model.compile_scope=model under FSDP, which shards and gathers each decoder layer "
                          "by hooks a whole-model graph would trace through: set model.compile_scope=layers")
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


def _liger_available() -> bool:
    """liger-kernel imports (it needs Triton, which a CPU-only torch lacks)."""
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True
