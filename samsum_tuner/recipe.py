"""Reading a recipe: defaults <- YAML file <- command-line overrides, with the names users bring from the original
llama-recipes flags, peft, bitsandbytes and TRL, then checked (`checks.validate`)."""
from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .config import SECTIONS, Recipe, TrainConfig, field_types
from .checks import validate
from .errors import ConfigError, brief as _brief
from .yaml_io import load_yaml, read_yaml


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


def _bits_if(bits: int):
    def convert(v: Any, key: str) -> int | None:
        return bits if _to_bool(v, key) else None
    return convert


def _half_dtype(v: Any, key: str) -> str | None:
    text = str(v).lower().removeprefix("torch.")
    if text in ("none", "null", "auto"):
        return None
    if text not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"{key}: expected float32, bfloat16 or float16, got {v!r}")
    return text


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
    # TRL's flat flags and peft's / bitsandbytes' own names (any TrainingArguments field is flat too: see apply_key)
    "model_name_or_path": ("model.name", None),
    "model_revision": ("model.revision", None),
    "torch_dtype": ("model.dtype", _half_dtype),
    "dtype": ("model.dtype", _half_dtype),
    "attn_implementation": ("model.attn_implementation", None),
    "trust_remote_code": ("model.trust_remote_code", None),
    "gradient_checkpointing": ("model.gradient_checkpointing", _to_bool),
    "dataset_name": ("data.source", None),
    "lora_r": ("lora.r", None),
    "lora_alpha": ("lora.alpha", None),
    "lora_dropout": ("lora.dropout", None),
    "lora_target_modules": ("lora.target_modules", None),
    "target_modules": ("lora.target_modules", None),
    "load_in_4bit": ("quantization.bits", _bits_if(4)),
    "load_in_8bit": ("quantization.bits", _bits_if(8)),
    "bnb_4bit_quant_type": ("quantization.quant_type", None),
    "bnb_4bit_use_double_quant": ("quantization.double_quant", _to_bool),
    "use_bnb_nested_quant": ("quantization.double_quant", _to_bool),
}


TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig) if f.init}
OVERRIDE = "override "  # where a command-line entry comes from, as its messages name it


def _all_keys() -> list[str]:
    keys = []
    for section in SECTIONS:
        cls = type(getattr(Recipe(), section))
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls) if f.init]
    return keys + ["description"]


def _unknown_key(key: str, where: str) -> ConfigError:
    candidates = _all_keys() + list(ALIASES)
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    if not close:  # a misspelt leaf under the right section, or the right leaf alone
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in candidates if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]], cutoff=0.75)][:3]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"{where}unknown key '{key}'{hint}")


def _has_type(value: Any, typ: Any) -> bool:
    """Whether `value` already is a `typ`: a class, a generic such as list[str], or one of a Literal's values."""
    origin = typing.get_origin(typ)
    if origin is typing.Literal:
        return value in typing.get_args(typ)
    cls = origin or typ
    return isinstance(cls, type) and isinstance(value, cls)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 or typing.get_origin(inner[0]) is typing.Literal:  # Literal["auto"] | bool: checks.py
            return _coerce(value, inner[0], key)
        # TrainingArguments' unions (SchedulerType | str, dict | str, str | bool): the type the value has, else
        # the first that takes it
        same = [a for a in inner if _has_type(value, a)]
        for a in same + [a for a in inner if a not in same]:
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {' or '.join(getattr(a, '__name__', str(a)) for a in inner)}, got "
                          f"{_brief(value)}")
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
    if origin is dict or typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_brief(value)}")
        return value
    if isinstance(typ, type) and issubclass(typ, enum.Enum):  # TrainingArguments' choices: checked by checks.py
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected one of {', '.join(str(m.value) for m in typ)}, got {_brief(value)}")
        return value
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
    hints = field_types(type(obj))
    if leaf not in hints:
        raise _unknown_key(path, where)
    setattr(obj, leaf, _coerce(raw, hints[leaf], f"{where}{path}"))


def _parse_scalar(text: str, key: str = "") -> Any:
    """An override's value as YAML; `key=` and `key= ` mean the text itself. Refusals name the override's key."""
    try:
        return load_yaml(text, f"{OVERRIDE}{key}".strip()) if text.strip() else text
    except (yaml.YAMLError, ValueError, RecursionError):
        return text


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and (prefix == "" and k in SECTIONS):
            out += _flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


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
            recipe = f"; a recipe file is named first and ends in .yaml ({tok}.yaml?)" if "/" in tok else ""
            raise ConfigError(f"argument '{tok}': expected key=value or --key value{recipe}")
        i += 1
    return pairs


def build_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Recipe:
    """Defaults (the original's training configuration) <- YAML file <- overrides, then validated."""
    recipe = Recipe()
    pending: dict[str, Any] = {}
    entries: list[tuple[str, Any, str]] = []
    if path is not None:
        p = Path(path)
        entries += [(k, v, f"{p}: ") for k, v in _flatten(read_yaml(p))]
    entries += [(k, _parse_scalar(v, k), OVERRIDE) for k, v in split_overrides(list(overrides or []))]
    overridden = set()  # the recipe keys the command line sets
    for key, value, where in entries:
        target = apply_key(recipe, key, value, where, pending)
        if where == OVERRIDE:
            overridden.add(target)
    if "_batch_size_training" in pending:
        bst = _coerce(pending["_batch_size_training"], int, "batch_size_training")
        micro = recipe.train.per_device_train_batch_size
        if micro <= 0 or bst <= 0 or bst % micro:
            raise ConfigError(
                f"batch_size_training={bst} must be a positive multiple of micro_batch_size={micro}"
            )
        recipe.train.gradient_accumulation_steps = bst // micro
    if pending.get("_fast_path"):
        _fast_path(recipe, overridden)
    validate(recipe)
    return recipe


def _fast_path(recipe: Recipe, overridden: set[str | None]) -> None:
    """`fast_path=true`: the recipe's samples per optimizer step packed padding-free into one row per step instead
    of micro-batches accumulated one by one: the same loss, without the padding and the accumulation loop. A recipe
    that batches by tokens keeps its budget. Attention is sdpa unless the command line names one: these rows change
    length every step, and flex_attention compiles again at every new shape (it pays off with fixed shapes,
    docs/notes.md). Applied after every override (it reads the final batch and accumulation)."""
    d, t = recipe.data, recipe.train
    if "data.packing" in overridden and not d.packing:
        raise ConfigError("fast_path=true packs each optimizer step's samples into one row; the override "
                          "data.packing=false contradicts it: drop one of the two")
    d.packing = True
    if "model.attn_implementation" not in overridden:
        recipe.model.attn_implementation = "sdpa"
    if d.max_tokens_per_batch is None:
        t.per_device_train_batch_size *= t.gradient_accumulation_steps
        t.gradient_accumulation_steps = 1


def apply_key(recipe: Recipe, key: str, value: Any, where: str, pending: dict[str, Any]) -> str | None:
    """Set one entry; the recipe key it set (an alias resolved), or None where it set none (held in `pending`)."""
    if key in ALIASES:
        target, convert = ALIASES[key]
        if convert is not None:
            value = convert(value, f"{where}{key}")
        if target is None:
            return None
        if target.startswith("_"):
            pending[target] = value
            return None
        key = target
    elif "." not in key and key in TRAIN_KEYS:  # TRL's flat flags: --learning_rate, --per_device_train_batch_size
        key = f"train.{key}"
    _set(recipe, key, value, where)
    return key
