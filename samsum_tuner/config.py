"""Recipes: YAML + command-line overrides -> validated dataclasses.

A knob lives in exactly one field here and is read by exactly one builder.
Names follow `transformers.TrainingArguments` where one exists; the original
llama-recipes flags are accepted as aliases (see `ALIASES`).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

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
    attn_implementation: str = _knob("sdpa", "attention kernel: sdpa, eager or flex_attention (CUDA only)")
    # Read only through Recipe.checkpoints_activations.
    gradient_checkpointing: bool | None = _knob(
        None, "recompute each decoder layer in backward from its saved input; null: on under FSDP (as "
        "llama-recipes' fsdp_activation_checkpointing), off otherwise")
    # One compiled graph serves every layer: it fuses the elementwise chains (RMSNorm, RoPE, SiLU x up, casts)
    # that eager mode launches one kernel at a time.
    compile: typing.Literal["auto"] | bool = _knob(
        False, "torch.compile each decoder layer in place: true, false, or auto (compiled where CUDA is available, "
        "eager elsewhere)")
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
class TrainConfig:
    output_dir: str = _knob("runs/samsum", "run directory: checkpoints, adapter or model, logs, summaries")
    overwrite_output_dir: bool = _knob(False, "reuse a non-empty run directory (old checkpoints move aside)")
    per_device_train_batch_size: int = _knob(1, "samples per micro-batch per process")
    per_device_eval_batch_size: int = _knob(1, "samples per evaluation batch per process")
    gradient_accumulation_steps: int = _knob(4, "micro-batches per optimizer step")
    learning_rate: float = _knob(1e-4, "peak learning rate")
    weight_decay: float = _knob(0.0, "decoupled weight decay (AdamW) or L2 (SGD)")
    num_train_epochs: float = _knob(3.0, "passes over the train split")
    max_steps: int = _knob(-1, "optimizer steps to stop after (-1: the epochs decide)")
    lr_scheduler_type: str = _knob("steplr", "steplr (the original's per-epoch StepLR(gamma)) or any HF scheduler "
                                   "name")
    gamma: float = _knob(0.85, "StepLR decay per epoch, in (0, 1]")
    warmup_steps: int = _knob(0, "steps of linear warmup")
    optim: str = _knob("adamw_torch", "HF optimizer name, or sgd (a real torch.optim.SGD with momentum)")
    momentum: float = _knob(0.9, "SGD momentum (sgd only)")
    max_grad_norm: float = _knob(0.0, "gradient clipping norm (0: none, as the original)")
    fp16: bool = _knob(False, "fp16 mixed precision: fp32 weights, fp16 autocast, loss scaling (--use_fp16)")
    bf16: bool = _knob(False, "bf16 mixed precision: bf16 autocast over the stored weights")
    seed: int = _knob(42, "seed of initialisation, data order and dropout")
    logging_steps: int = _knob(10, "optimizer steps between logged losses")
    eval_strategy: str = _knob("epoch", "when to evaluate: no, epoch or steps")
    eval_steps: int | None = _knob(None, "optimizer steps between evaluations (eval_strategy=steps)")
    eval_on_start: bool = _knob(False, "an eval_loss before the first step, to show it falling")
    # SAMSum's prompts are ~85% of the tokens: their logits are never read by the loss.
    supervised_logits_only: bool = _knob(True, "lm_head only where a label is supervised (the summary): the same "
                                         "loss without the vocab x prompt-tokens logits")
    eval_rouge_rows: int = _knob(0, "ROUGE by greedy generation on the first N validation rows at every "
                                 "evaluation (0: off; one process)")
    save_strategy: str = _knob("epoch", "when to checkpoint: no, epoch or steps")
    save_steps: int | None = _knob(None, "optimizer steps between checkpoints (save_strategy=steps)")
    save_total_limit: int | None = _knob(2, "complete checkpoints kept (null: all); the newest is never deleted")
    save_model: bool = _knob(True, "save the adapter or the model at the end")
    dataloader_num_workers: int = _knob(0, "data loader worker processes")
    resume_from_checkpoint: str | None = _knob(None, "auto (the last complete checkpoint in output_dir, or a fresh "
                                               "start) or a checkpoint folder")
    report_to: list[str] = _knob(["tensorboard"], "Trainer log integrations (comma-separated; [] for none)")
    disable_tqdm: bool = _knob(False, "no progress bar")


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
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @property
    def is_full_finetune(self) -> bool:
        return not self.lora.enabled

    @property
    def checkpoints_activations(self) -> bool:
        """Whether each decoder layer is checkpointed: the one answer that training (transformers' gradient
        checkpointing, or peft's on a quantized model, with or without FSDP) and the planner use."""
        g = self.model.gradient_checkpointing
        return self.fsdp.enabled if g is None else g


SECTIONS = [f.name for f in dataclasses.fields(Recipe)
            if dataclasses.is_dataclass(f.default_factory)]  # type: ignore[arg-type]


# ---------------------------------------------------------------- aliases
def _to_bool(v: Any, key: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "yes", "1", "on"):
        return True
    if isinstance(v, str) and v.lower() in ("false", "no", "0", "off"):
        return False
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise ConfigError(f"{key}: expected true or false, got {v!r}")


def _quantization_bits(v: Any, key: str) -> int | None:
    # The seed's fork: `--quantization True` meant 4-bit NF4.
    if isinstance(v, str) and v.lower() in ("4bit", "4", "nf4"):
        return 4
    if isinstance(v, str) and v.lower() in ("8bit", "8", "int8"):
        return 8
    if isinstance(v, int) and not isinstance(v, bool) and v in (4, 8):
        return v
    return 4 if _to_bool(v, key) else None


def _optimizer_name(v: Any, key: str) -> str:
    names = {"sgd": "sgd", "adamw": "adamw_torch", "anyprecision": "adamw_torch"}
    got = str(v).lower()
    if got not in names:
        raise ConfigError(f"{key}: unknown optimizer {v!r}; use SGD or AdamW")
    return names[got]


def _peft_method(v: Any, key: str) -> str:
    if str(v).lower() != "lora":
        raise ConfigError(f"{key}: only 'lora' is supported, got {v!r}")
    return "lora"


def _dataset_name(v: Any, key: str) -> None:
    if str(v) not in ("samsum_dataset", "samsum"):
        raise ConfigError(f"{key}: samsum_tuner trains on SAMSum only, got {v!r}")


def _pure_bf16(v: Any, key: str) -> str | None:
    return "bfloat16" if _to_bool(v, key) else None


# alias -> (recipe path, converter). `None` path: accepted and checked, nothing to set.
ALIASES: dict[str, tuple[str | None, Any]] = {
    "use_peft": ("lora.enabled", _to_bool),
    "peft_method": ("lora.method", _peft_method),
    "quantization": ("quantization.bits", _quantization_bits),
    "use_fp16": ("train.fp16", _to_bool),
    "enable_fsdp": ("fsdp.enabled", _to_bool),
    "fsdp_config.fsdp_cpu_offload": ("fsdp.cpu_offload", _to_bool),
    "fsdp_config.optimizer": ("train.optim", _optimizer_name),
    "fsdp_config.pure_bf16": ("model.dtype", _pure_bf16),
    "fsdp_config.fsdp_activation_checkpointing": ("model.gradient_checkpointing", _to_bool),
    "split_slice": ("data.split_slice", None),
    "batch_size_training": ("_batch_size_training", None),
    "micro_batch_size": ("train.per_device_train_batch_size", None),
    "val_batch_size": ("train.per_device_eval_batch_size", None),
    "num_epochs": ("train.num_train_epochs", None),
    "lr": ("train.learning_rate", None),
    "gamma": ("train.gamma", None),
    "weight_decay": ("train.weight_decay", None),
    "seed": ("train.seed", None),
    "model_name": ("model.name", None),
    "output_dir": ("train.output_dir", None),
    "save_model": ("train.save_model", _to_bool),
    "num_workers_dataloader": ("train.dataloader_num_workers", None),
    "dataset": (None, _dataset_name),
    "resume": ("train.resume_from_checkpoint", None),
    "resume_from_checkpoint": ("train.resume_from_checkpoint", None),
    "fast_path": ("_fast_path", _to_bool),
}


# ---------------------------------------------------------------- building
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _all_keys() -> list[str]:
    keys = []
    for section in SECTIONS:
        cls = type(getattr(Recipe(), section))
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys + ["description"]


def _unknown_key(key: str, where: str) -> ConfigError:
    candidates = _all_keys() + list(ALIASES)
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    if not close:  # a misspelt leaf under the right section, or the right leaf alone
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in candidates if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]], cutoff=0.75)][:3]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"{where}unknown key '{key}'{hint}")


def _brief(value: Any) -> str:
    """A value as it goes into a one-line message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_brief(value)}")
        return [_coerce(v, args[0], key) for v in value]
    if typ is bool:
        return _to_bool(value, key)
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {_brief(value)}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {_brief(value)}") from None
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {_brief(value)}")
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an integer beyond any float
            raise ConfigError(f"{key}: expected a number, got {_brief(value)}") from None
    if typ is str:
        if value is None:  # `null` where null is no choice: it would become the text "None"
            raise ConfigError(f"{key}: expected a string, got null")
        if isinstance(value, bool):  # YAML 1.1 reads `no`/`yes` as booleans: `save_strategy: no` means "no"
            return "yes" if value else "no"
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {_brief(value)}")
        return str(value)
    return value


def _set(recipe: Recipe, path: str, raw: Any, where: str = "") -> None:
    if path == "description":
        recipe.description = str(raw)
        return
    section, _, leaf = path.partition(".")
    if section not in SECTIONS or not leaf:
        raise _unknown_key(path, where)
    obj = getattr(recipe, section)
    types = _field_types(type(obj))
    if leaf not in types:
        raise _unknown_key(path, where)
    setattr(obj, leaf, _coerce(raw, types[leaf], f"{where}{path}"))


def _parse_scalar(text: str) -> Any:
    try:
        return _load_yaml(text, "override") if text.strip() else text  # `key=` and `key= ` mean the text itself
    except (yaml.YAMLError, ValueError, RecursionError):
        return text


# A YAML alias repeats the node it names without copying it, so nested aliases ("billion laughs") let a few
# hundred bytes stand for billions of values, which building the recipe would then walk. Every real recipe is a
# few dozen values; this bound is far above any of them.
MAX_YAML_VALUES = 100_000


def _expanded_size(root: yaml.Node, where: str) -> int:
    """How many values the document stands for once every alias is expanded, counted over the node graph (each
    node once), stopping past MAX_YAML_VALUES; an alias inside the node it names is refused."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative: a deeply nested document must not exhaust Python's stack here
        node, finished = stack.pop()
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        if finished:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_YAML_VALUES:
                return sizes[id(node)]
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_nodes:
            raise ConfigError(f"{where}:{node.start_mark.line + 1}: invalid YAML: an alias refers to the node that "
                              "holds it")
        open_nodes.add(id(node))
        stack.append((node, True))
        stack += [(c, False) for c in children if id(c) not in sizes]
    return sizes[id(root)]


def _load_yaml(text: str, where: str) -> Any:
    """yaml.safe_load, refusing documents whose aliases expand past MAX_YAML_VALUES before building them."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, where) > MAX_YAML_VALUES:
            raise ConfigError(f"{where}: refused: its YAML aliases expand to more than {MAX_YAML_VALUES:,} values "
                              "(a recipe has a few dozen)")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and (prefix == "" and k in SECTIONS):
            out += _flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        if not path.is_file():
            raise ConfigError(f"{path}: recipe file not found")
        text = path.read_text(encoding="utf-8")
    except OSError as e:  # a name too long, a folder we may not enter
        raise ConfigError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        data = _load_yaml(text, str(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{line}: invalid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    except ValueError as e:  # a value YAML parses but Python cannot hold, e.g. an integer of thousands of digits
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0][:120]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections (model:, train:, ...)")
    return data


def split_overrides(tokens: list[str]) -> list[tuple[str, str]]:
    """`a.b=c`, `--a.b c`, `--a.b=c` and bare `--flag` (true) -> [(key, text)]."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--"):
            key = tok[2:]
            if "=" in key:
                key, _, val = key.partition("=")
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--") and "=" not in tokens[i + 1]:
                i += 1
                val = tokens[i]
            else:
                val = "true"
            pairs.append((key, val))
        elif "=" in tok:
            key, _, val = tok.partition("=")
            pairs.append((key, val))
        else:
            raise ConfigError(f"argument '{tok}': expected key=value or --key value")
        i += 1
    return pairs


def build_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Recipe:
    """Defaults (the original's training configuration) <- YAML file <- overrides, then validated."""
    recipe = Recipe()
    pending: dict[str, Any] = {}
    entries: list[tuple[str, Any, str]] = []
    if path is not None:
        p = Path(path)
        entries += [(k, v, f"{p}: ") for k, v in _flatten(_read_yaml(p))]
    entries += [(k, _parse_scalar(v), "override ") for k, v in split_overrides(list(overrides or []))]
    for key, value, where in entries:
        apply_key(recipe, key, value, where, pending)
    if "_batch_size_training" in pending:
        bst = _coerce(pending["_batch_size_training"], int, "batch_size_training")
        micro = recipe.train.per_device_train_batch_size
        if micro <= 0 or bst <= 0 or bst % micro:
            raise ConfigError(
                f"batch_size_training={bst} must be a positive multiple of micro_batch_size={micro}"
            )
        recipe.train.gradient_accumulation_steps = bst // micro
    if pending.get("_fast_path"):
        _fast_path(recipe)
    validate(recipe)
    return recipe


def _fast_path(recipe: Recipe) -> None:
    """`fast_path=true`: the recipe's samples per optimizer step, packed padding-free into one row per step
    (attention confined to each sample through the position ids) instead of micro-batches accumulated one by
    one. The step's loss is the same mean over its supervised tokens; what goes is the padding and the
    accumulation loop. A recipe that already batches by tokens keeps its budget. Attention is sdpa on every
    device: these rows change length every step, and flex_attention compiles again whenever the number of
    128-token blocks changes (on 2 H200s a 7B full_sgd fast path trained 12 steps, then spent its last two
    minutes compiling for a 64-row evaluation); flex_attention pays off with fixed shapes
    (`data.pad_to_multiple_of` = `data.max_tokens_per_batch`, as the fast recipes do)."""
    d, t = recipe.data, recipe.train
    d.packing = True
    recipe.model.attn_implementation = "sdpa"
    if d.max_tokens_per_batch is None:
        t.per_device_train_batch_size *= t.gradient_accumulation_steps
        t.gradient_accumulation_steps = 1


def apply_key(recipe: Recipe, key: str, value: Any, where: str, pending: dict[str, Any]) -> None:
    if key in ALIASES:
        target, convert = ALIASES[key]
        if convert is not None:
            value = convert(value, f"{where}{key}")
        if target is None:
            return
        if target.startswith("_"):
            pending[target] = value
            return
        key = target
    _set(recipe, key, value, where)


# ---------------------------------------------------------------- validation
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
                "integration": {"tensorboard"}, "attention implementation": {"eager", "sdpa", "flex_attention"}}


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


def check_output_location(run_dir: str) -> None:
    """train.output_dir can be created, or written if it exists: refused before the model loads, not at the
    first save."""
    path = Path(run_dir).expanduser().absolute()
    try:
        existing = path
        while not existing.exists():  # the nearest folder that is there
            existing = existing.parent
    except OSError as e:
        raise ConfigError(f"train.output_dir: cannot look at {run_dir} ({e.strerror})") from None
    if not existing.is_dir():
        raise ConfigError(f"train.output_dir: {existing} is a file, not a folder")
    if existing == path:
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"train.output_dir: {path} is not writable")
        return
    try:  # a folder made and removed where the run's will go: permissions, read-only mounts, /proc, for root too
        os.rmdir(tempfile.mkdtemp(prefix=".samsum-tuner-check-", dir=existing))
    except OSError as e:
        raise ConfigError(f"train.output_dir: cannot create {path} ({existing}: {e.strerror})") from None


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
    if d.max_tokens_per_batch is not None and d.max_tokens_per_batch < d.max_length:
        raise ConfigError(f"data.max_tokens_per_batch ({d.max_tokens_per_batch}) must be at least data.max_length "
                          f"({d.max_length}): the longest sample must fit a batch")
    if t.eval_rouge_rows < 0:
        raise ConfigError(f"train.eval_rouge_rows must be 0 (off) or positive, got {t.eval_rouge_rows}")
    if t.eval_rouge_rows and not d.eval_split:
        raise ConfigError("train.eval_rouge_rows needs an evaluation split (data.eval_split)")
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
                       "train.dataloader_num_workers": t.dataloader_num_workers}.items():
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
    if t.eval_strategy == "steps" and not t.eval_steps:
        raise ConfigError("train.eval_strategy=steps needs train.eval_steps")
    if t.save_strategy == "steps" and not t.save_steps:
        raise ConfigError("train.save_strategy=steps needs train.save_steps")
    from .data import parse_slice  # the one parser of slice syntax

    for key, value in (("data.split_slice", d.split_slice), ("data.eval_slice", d.eval_slice)):
        if value is not None:
            parse_slice(value, key)
    _check_library_names(m, t)  # last: an unusual name imports transformers' trainer modules (seconds)


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
