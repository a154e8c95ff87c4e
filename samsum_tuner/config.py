"""What a recipe holds: one small dataclass per concern, and `train:`, a `transformers.TrainingArguments`.

A knob lives in exactly one field here; `resolve` turns the recipe into the objects that use it. Reading
YAML and overrides is `recipe.py`, refusing impossible recipes `checks.py`.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml
from transformers import TrainingArguments

ORIGINAL_PROMPT = "Summarize this dialog:\n{dialog}\n---\nSummary:\n"


def _knob(default: Any, help: str) -> Any:
    """A recipe field and its one line of help (`samsum-tuner keys`); a list default is copied per recipe."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name: str = _knob("meta-llama/Llama-2-7b-hf", "hub id, local HF folder, smollm2-135m (embedded) or "
                      "random:llama2-7b|13b|70b (real shapes, random weights)")
    dtype: str | None = _knob(None, "storage dtype of the weights: null = float32, as the original loaded them; "
                              "bfloat16/float16 = pure half-precision weights (an explicit choice)")
    attn_implementation: str = _knob("sdpa", "attention: sdpa, eager, flex_attention (CUDA) or varlen_attn (packed)")
    # Read only through Recipe.checkpoints_activations.
    gradient_checkpointing: bool | None = _knob(
        None, "recompute each decoder layer in backward from its saved input; null: on under FSDP (as "
        "llama-recipes' fsdp_activation_checkpointing), off otherwise")
    # One compiled graph serves every layer: it fuses the elementwise chains (RMSNorm, RoPE, SiLU x up, casts)
    # that eager mode launches one kernel at a time.
    compile: typing.Literal["auto"] | bool = _knob(
        False, "torch.compile each decoder layer in place: true, false, or auto (compiled where CUDA is available, "
        "eager elsewhere)")
    compile_mode: str | None = _knob(None, "torch.compile's mode for those layers: null (its default), "
                                     "reduce-overhead (CUDA graphs), max-autotune or max-autotune-no-cudagraphs")
    # One entry into compiled code a step instead of one a layer: for a small model the host's per-layer work
    # (guards, wrappers) sets the pace, and CUDA graphs (reduce-overhead) then capture the whole stack.
    compile_scope: str = _knob("layers", "what model.compile compiles: layers (each decoder layer in place) or "
                               "model (the decoder stack as one graph, its layers compiled once as a nested "
                               "region; one process, no gradient checkpointing)")
    trust_remote_code: bool = _knob(False, "run the model repository's own Python code")
    revision: str | None = _knob(None, "hub branch, tag or commit of the model (null: main)")


@dataclass
class QuantizationConfig:
    bits: int | None = _knob(None, "null, 4 (NF4 through bitsandbytes, QLoRA) or 8 (LLM.int8)")
    quant_type: str = _knob("nf4", "4-bit data type: nf4 or fp4")
    double_quant: bool = _knob(True, "quantize the 4-bit quantization constants too (QLoRA's double quantization)")


@dataclass
class LoraConfig:
    enabled: bool = _knob(False, "train LoRA adapters on a frozen base (the original's --use_peft)")
    method: str = _knob("lora", "PEFT method: lora only")
    r: int = _knob(8, "adapter rank")
    alpha: int = _knob(32, "adapter scale numerator (scale = alpha / r)")
    dropout: float = _knob(0.05, "dropout on the adapters' input, in [0, 1)")
    target_modules: list[str] = _knob(["q_proj", "v_proj"], "linear layers that get adapters (comma-separated)")
    bias: str = _knob("none", "which biases train: none, all or lora_only")
    autocast_adapter_dtype: bool = _knob(True, "peft's default: adapters in fp32 over bf16/fp16 weights (false: "
                                         "in the weights' dtype, no casts around each adapter)")


@dataclass
class DataConfig:
    source: str = _knob("knkarthick/samsum", "hub dataset id or a local folder of train/validation/test "
                        ".jsonl[.gz]/.json; SAMSUM_DATA_DIR (a folder) stands in for SAMSum's hub ids")
    train_split: str = _knob("train", "split to train on")
    eval_split: str | None = _knob("validation", "split to evaluate on (null: no evaluation)")
    split_slice: str | None = _knob(None, "rows of train and eval alike, as the original: 1%, 10 or [:100]")
    eval_slice: str | None = _knob(None, "a different slice for the eval split only")
    prompt_template: str = _knob(ORIGINAL_PROMPT, "prompt before the summary; must contain {dialog}")
    chat_template: bool = _knob(False, "wrap the prompt in the tokenizer's chat template")
    completion_only_loss: bool = _knob(True, "loss on the summary tokens only (false: on the prompt too)")
    max_length: int = _knob(2048, "tokens per sample; longer rows lose dialogue tokens, never summary tokens")
    packing: bool = _knob(False, "padding-free batches: samples packed into one row, attention kept apart")
    longest_first: bool = _knob(False, "the longest batch trains first: an out-of-memory shows at step 1")
    # Memory is then bounded by the budget, not by the longest sample.
    max_tokens_per_batch: int | None = _knob(None, "batches by tokens instead of rows (packed: their sum; padded: "
                                             "rows x the longest); replaces the train and eval batch sizes")
    # Compiled kernels such as flex_attention compile once per shape: N = max_tokens_per_batch gives every step
    # the same shape, where varying packed lengths recompile again and again.
    pad_to_multiple_of: int | None = _knob(None, "pad rows to a multiple of N tokens (packed: the one row, with an "
                                           "unsupervised tail sample)")
    num_proc: int | None = _knob(None, "processes that tokenize the splits (null: one)")


@dataclass
class TrainConfig(TrainingArguments):
    """`train:`: every TrainingArguments field (what `training_args.json` records), the original's defaults, and a
    few fields of ours. Values only: `completed()` makes the copy the Trainer gets."""

    output_dir: str = _knob("runs/samsum", "run directory: checkpoints, adapter or model, logs, summaries")
    per_device_train_batch_size: int = _knob(1, "samples per micro-batch per process")
    per_device_eval_batch_size: int = _knob(1, "samples per evaluation batch per process")
    gradient_accumulation_steps: int = _knob(4, "micro-batches per optimizer step")
    learning_rate: float = _knob(1e-4, "peak learning rate")
    weight_decay: float = _knob(0.0, "decoupled weight decay (AdamW) or L2 (SGD), not on biases and norms")
    num_train_epochs: float = _knob(3.0, "passes over the train split")
    max_steps: int = _knob(-1, "optimizer steps to stop after (-1: the epochs decide)")
    lr_scheduler_type: str = _knob("steplr", "steplr (the original's per-epoch StepLR(gamma)) or any HF scheduler "
                                   "name")
    warmup_steps: int = _knob(0, "steps of linear warmup")
    optim: str = _knob("adamw_torch", "HF optimizer name; sgd is torch.optim.SGD with train.momentum")
    max_grad_norm: float = _knob(0.0, "gradient clipping norm (0: none, as the original)")
    fp16: bool = _knob(False, "fp16 mixed precision: fp32 weights, fp16 autocast, loss scaling (--use_fp16)")
    bf16: bool = _knob(False, "bf16 mixed precision: bf16 autocast over the stored weights")
    seed: int = _knob(42, "seed of initialisation, data order and dropout")
    logging_steps: int = _knob(10, "optimizer steps between logged losses")
    logging_first_step: bool = _knob(True, "log the first step's loss too")
    eval_strategy: str = _knob("epoch", "when to evaluate: no, epoch or steps")
    eval_steps: int | None = _knob(None, "optimizer steps between evaluations (eval_strategy=steps)")
    eval_on_start: bool = _knob(False, "an eval_loss before the first step, to show it falling")
    # Evaluation reports the loss; without this the Trainer keeps every eval batch's logits (vocab x tokens) on
    # the device until the end: gigabytes for a 7B on the full validation split.
    prediction_loss_only: bool = _knob(True, "evaluation computes the loss only, keeping no logits")
    save_strategy: str = _knob("epoch", "when to checkpoint: no, epoch or steps")
    save_steps: int | None = _knob(None, "optimizer steps between checkpoints (save_strategy=steps)")
    save_total_limit: int | None = _knob(2, "complete checkpoints kept (null: all); the newest is never deleted")
    dataloader_num_workers: int = _knob(0, "data loader worker processes")
    resume_from_checkpoint: str | None = _knob(None, "auto (the last complete checkpoint in output_dir, or a fresh "
                                               "start) or a checkpoint folder")
    report_to: list[str] = _knob(["tensorboard"], "Trainer log integrations (comma-separated; [] for none)")
    disable_tqdm: bool = _knob(False, "no progress bar")
    # Our tokenized splits hold exactly the model's inputs.
    remove_unused_columns: bool = _knob(False, "drop dataset columns the model's forward does not take")
    # Counted on the device by SamsumTrainer instead: the Trainer's count reads the GPU back every micro-batch.
    include_num_input_tokens_seen: str = _knob("no", "the Trainer's own token count (samsum_tuner counts anyway)")
    # Its NaN filter reads the loss back every micro-batch; NonFiniteGuard stops a run whose loss is not finite.
    logging_nan_inf_filter: bool = _knob(False, "leave non-finite losses out of the logged mean")
    # ours
    overwrite_output_dir: bool = _knob(False, "reuse a non-empty run directory (old checkpoints move aside)")
    gamma: float = _knob(0.85, "StepLR decay per epoch, in (0, 1]")
    momentum: float = _knob(0.9, "SGD momentum (optim=sgd only)")
    # SAMSum's prompts are ~85% of the tokens: their logits are never read by the loss.
    supervised_logits_only: bool = _knob(True, "lm_head only where a label is supervised (the summary): the same "
                                         "loss without the vocab x prompt-tokens logits")
    eval_rouge_rows: int = _knob(0, "ROUGE by greedy generation on the first N validation rows at every "
                                 "evaluation (0: off; one process)")
    save_model: bool = _knob(True, "save the adapter or the model at the end")

    def __post_init__(self) -> None:
        # Deferred to completed(): TrainingArguments.__post_init__ sets up devices (under a launcher, the process
        # group) and exports FSDP variables, which a recipe being checked, planned or listed must not do.
        pass

    def completed(self, **changes: Any) -> "TrainConfig":
        """A copy with `changes`, completed as TrainingArguments: what the Trainer gets and training_args.json
        records."""
        args = dataclasses.replace(self, **changes)
        steplr = args.lr_scheduler_type == "steplr"  # ours (SamsumTrainer.create_scheduler); HF has no such name
        if steplr:
            args.lr_scheduler_type = "constant"
        TrainingArguments.__post_init__(args)
        if steplr:
            args.lr_scheduler_type = "steplr"
        return args


OURS = tuple(TrainConfig.__annotations__)  # train keys with our default or meaning, listed first


@dataclass
class FsdpConfig:
    enabled: bool = _knob(False, "shard with FSDP (torchrun; under accelerate launch it must match the config)")
    cpu_offload: bool = _knob(False, "FSDP keeps parameters, gradients and optimizer states in host memory")
    sharding_strategy: str = _knob("FULL_SHARD", "FULL_SHARD, SHARD_GRAD_OP, NO_SHARD or HYBRID_SHARD")
    version: int = _knob(2, "FSDP 1 or 2 (per-parameter sharding)")
    # With gradient accumulation the Trainer skips gradient sync on all but the last micro-batch; under FSDP2
    # that keeps every layer's gradient unsharded until then (all of them: 4 bytes per fp32 parameter on every
    # rank, not 4/N). False trades that memory for speed (the planner counts it either way).
    reduce_every_micro_batch: bool = _knob(True, "reduce-scatter gradients after every micro-batch, so they stay "
                                           "sharded under gradient accumulation")


@dataclass
class MemoryConfig:
    log_every_steps: int = _knob(0, "memory records every N steps too (0: per epoch only)")
    sample_interval_s: float = _knob(0.05, "host RSS sampling period of the background thread, seconds")
    gpu_limit_gib: float | None = _knob(None, "cap the GPU at this many GiB (set_per_process_memory_fraction)")
    preflight: bool = _knob(True, "run the memory planner before loading the model; refuse what will not fit")
    gpu_memory_gib: float | None = _knob(None, "GPU GiB the planner plans for (null: read from the machine)")
    host_memory_gib: float | None = _knob(None, "host GiB the planner plans for (null: read from the machine)")


@dataclass
class GuardConfig:
    # Both stop the run (exit 4) naming the last good checkpoint. From its initial 2**16 a healthy fp16 run backs
    # off a dozen times at most; 30 skips means overflow even at a scale far below 1.
    max_nonfinite_steps: int = _knob(1, "optimizer steps in a row with a NaN/inf loss before stopping (0: off)")
    max_skipped_steps: int = _knob(30, "optimizer steps in a row the fp16 loss scaler skips before stopping "
                                   "(0: off)")


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    description: str = _knob("", "free text about the recipe")

    def to_dict(self) -> dict[str, Any]:
        """Every section; of `train`, our keys and any TrainingArguments field set away from its default."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in SECTIONS:
            out[name] = _section_dict(out[name])
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @property
    def checkpoints_activations(self) -> bool:
        """Whether each decoder layer is checkpointed: the one answer that training (transformers' gradient
        checkpointing, or peft's on a quantized model, with or without FSDP) and the planner use."""
        g = self.model.gradient_checkpointing
        return self.fsdp.enabled if g is None else g


SECTIONS = [f.name for f in dataclasses.fields(Recipe)
            if dataclasses.is_dataclass(f.default_factory)]  # type: ignore[arg-type]
TRAIN_DEFAULTS = TrainConfig()  # TrainingArguments' defaults, ours where we set them (values only: cheap)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """A section's field types, resolved once (a TrainingArguments has ~120 string annotations)."""
    return typing.get_type_hints(cls)


def _section_dict(section: Any) -> dict[str, Any]:
    """A section's fields; of `train`, ours and the TrainingArguments fields set away from their defaults."""
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        inherited = isinstance(section, TrainConfig) and f.name not in OURS
        if f.init and not (inherited and value == getattr(TRAIN_DEFAULTS, f.name)):
            out[f.name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    """Lists, dicts and scalars as YAML writes them (an Enum as its value)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return getattr(value, "value", value) if not isinstance(value, (bool, int, float, str, type(None))) else value


def describe_precision(recipe: Recipe) -> str:
    """What the run will compute in, in words; printed before training."""
    m, t, q = recipe.model, recipe.train, recipe.quantization
    fsdp = recipe.fsdp.enabled
    weights = m.dtype or "float32"
    if q.bits:
        compute = "float16" if t.fp16 else "bfloat16" if t.bf16 or m.dtype == "bfloat16" else "float32"
        base = (f"{q.bits}-bit {q.quant_type if q.bits == 4 else 'int8'} base weights, compute in {compute}, "
                "LoRA adapters in float32")
        if t.fp16:
            base += ", fp16 autocast with dynamic loss scaling"
        elif t.bf16:
            base += ", bf16 autocast"
        return base
    if t.fp16:
        if fsdp:
            return (f"fp16 mixed precision: {weights} sharded master weights, fp16 compute and gradient reduction, "
                    "dynamic loss scaling")
        return f"fp16 mixed precision: {weights} weights, fp16 autocast, dynamic loss scaling"
    if t.bf16:
        return f"bf16 mixed precision: {weights} weights, bf16 autocast"
    if m.dtype in ("bfloat16", "float16"):
        return f"pure {m.dtype} weights, gradients and optimizer states (no fp32 master copy)"
    return "fp32: float32 weights, gradients and optimizer states"
