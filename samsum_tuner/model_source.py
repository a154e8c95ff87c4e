"""Where the model comes from: a hub id, a local folder, the embedded SmolLM2 or a random Llama shape, checked
before anything loads (config, weight files, architecture, LoRA targets, remote code), and its tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import ConfigError
from .hub import hub_problem, in_hub_cache
from .shapes import LLAMA_SHAPES, RANDOM_PREFIX, random_shape_name, shape_for_model_name
from .smollm2 import EMBEDDED, embedded_model_dir, embedded_model_dir_cached, embedded_tokenizer, smollm2_gguf


# ---------------------------------------------------------------- where the model comes from
def looks_local(name: str) -> bool:
    """A local folder rather than a hub id: a path-like name, or one that exists on disk."""
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


LOCAL_HINT = (f"point model.name at a local HF folder (config.json + weights), or use {EMBEDDED} or "
              "random:llama2-7b / random:llama2-13b")


def check_model_source(m: ModelConfig) -> None:
    """Refuse a model that is not there, before anything heavy happens (for a folder: a stat)."""
    name = m.name
    shape = random_shape_name(name)
    if shape is not None:
        if shape not in LLAMA_SHAPES or not shape.startswith("llama2-"):
            choices = ", ".join(RANDOM_PREFIX + k for k in LLAMA_SHAPES if k.startswith("llama2-"))
            raise ConfigError(f"model.name: unknown random shape '{name}'; choose one of {choices}")
    elif name == EMBEDDED:
        if not (embedded_model_dir_cached()):
            smollm2_gguf()
    elif looks_local(name):
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            what = "does not exist" if not path.exists() else "has no config.json"
            raise ConfigError(f"model.name: local model folder {path} {what}")
    else:
        from huggingface_hub import constants

        why = (None if in_hub_cache(m.name, ("config.json",), revision=m.revision)
               else hub_problem(m.name, "config.json", constants.HF_HUB_OFFLINE, revision=m.revision))
        if why:  # at once, where the download below would retry an unreachable hub for ~25 s
            raise ConfigError(f"model.name: cannot reach '{m.name}' ({why}); {LOCAL_HINT}")
        _hub_config(m)


def check_model(m: ModelConfig, lora_targets: list[str] | None = None, *, loading: bool = False) -> None:
    """The model as far as it can be checked without its weights or code from its folder: config.json, a causal-LM
    class and the recipe's LoRA targets (after check_model_source). `loading`: the weights load next (a training
    run, not a dry run or a plan), so they must be there too; with trust_remote_code, a warning says whose code runs."""
    check_model_source(m)
    name = m.name
    if random_shape_name(name) is not None:
        config = load_model_config(m)
    elif name == EMBEDDED:
        from transformers import LlamaConfig

        # Before its first conversion only the module names matter here, and SmolLM2 is a Llama.
        config = load_model_config(m) if embedded_model_dir_cached() else LlamaConfig(num_hidden_layers=1)
    elif looks_local(name):
        config = _local_config(m, Path(name).expanduser())
        if loading:
            _check_weight_files(Path(name).expanduser())
    else:
        config = _hub_config(m)
    if m.trust_remote_code and random_shape_name(name) is None and name != EMBEDDED:
        _remote_code_notice(m, loading)
    if config is not None:
        _check_architecture(m, config, lora_targets)


def _reason(e: Exception) -> str:
    """A library's message on one line, cut short."""
    text = " ".join(str(e).split())
    return (text[:200] + "...") if len(text) > 200 else text or type(e).__name__


# config.json sizes a model divides by; the optional ones may be null (transformers then derives them)
OPTIONAL_SIZES = ("num_key_value_heads", "head_dim")
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", *OPTIONAL_SIZES)


def _local_config(m: ModelConfig, path: Path):
    """The folder's config.json checked as data first (so each fault is named), then read by transformers without
    its own code. None: the architecture is the folder's own code, which the recipe trusts."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    f = path / "config.json"
    try:
        raw = json.loads(f.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"model.name: cannot read {f} ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"model.name: {f} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"model.name: {f}:{e.lineno}: malformed JSON ({e.msg})") from None
    except (ValueError, RecursionError):  # an integer of thousands of digits, or nesting past Python's stack
        raise ConfigError(f"model.name: {f}: malformed JSON (a number out of range or nested too deeply)") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"model.name: {f}: expected a JSON object, got {type(raw).__name__}")
    model_type, auto_map = raw.get("model_type"), raw.get("auto_map")
    own_config = isinstance(auto_map, dict) and "AutoConfig" in auto_map
    if not (isinstance(model_type, str) and model_type in CONFIG_MAPPING):
        if own_config and m.trust_remote_code:
            return None
        if own_config:
            raise ConfigError(f"model.name: {path} defines its architecture in its own Python code (config.json "
                              "auto_map); set model.trust_remote_code=true only if you trust that code")
        if not isinstance(model_type, str) or not model_type:
            raise ConfigError(f"model.name: {f} has no model_type (e.g. \"llama\")")
        import transformers

        raise ConfigError(f"model.name: {f}: unknown model_type '{model_type}' (transformers "
                          f"{transformers.__version__} has no such architecture)")
    # before transformers divides by them (null: the KV heads and head size take their defaults)
    _check_sizes(f, {k: raw[k] for k in SIZES if k in raw and not (k in OPTIONAL_SIZES and raw[k] is None)})
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # wrong types, values transformers' own config validation refuses
        raise ConfigError(f"model.name: {f}: {_reason(e)}") from None
    _check_sizes(f, {k: getattr(config, k) for k in SIZES if getattr(config, k, None) is not None})  # aliases too
    if m.trust_remote_code and isinstance(auto_map, dict) and "AutoModelForCausalLM" in auto_map:
        return None  # the model class is the folder's own: its module names are unknown until its code runs
    return config


def _check_sizes(f: Path, sizes: dict) -> None:
    for key, value in sizes.items():
        if type(value) is not int or value <= 0:
            raise ConfigError(f"model.name: {f}: {key} must be a positive integer, got {value!r}"[:300])


def _hub_config(m: ModelConfig):
    """A hub model's config, read without running its code; None when it is code the recipe trusts."""
    from transformers import AutoConfig

    name = m.name
    try:
        return AutoConfig.from_pretrained(name, revision=m.revision, trust_remote_code=False)
    except Exception as e:  # offline, gated, misspelt, or code the recipe does (not) trust
        if m.trust_remote_code and "trust_remote_code" in str(e):
            return None
        raise ConfigError(f"model.name: cannot load '{name}' ({_reason(e)}); {LOCAL_HINT}") from None


def _check_weight_files(path: Path) -> None:
    """The weights from_pretrained will look for are there, whole as far as their safetensors headers go."""
    from safetensors import safe_open
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    files = None
    for index in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):
        if (path / index).is_file():
            try:
                shards = json.loads((path / index).read_text(encoding="utf-8"))["weight_map"].values()
                files = sorted({path / shard for shard in shards})
            except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
                raise ConfigError(f"model.name: {path / index} is not a weight index (JSON with a weight_map of "
                                  "tensor names to shard files)") from None
            break
    if files is None:
        files = [path / n for n in (SAFE_WEIGHTS_NAME, WEIGHTS_NAME) if (path / n).is_file()][:1]
        if not files:
            raise ConfigError(f"model.name: {path} holds no weights ({SAFE_WEIGHTS_NAME}, {WEIGHTS_NAME} or a "
                              "sharded index)")
    for f in files:
        if not f.is_file():
            raise ConfigError(f"model.name: {f.name}, a shard named in {path}'s weight index, is missing")
        if f.suffix == ".safetensors":
            try:  # reads the header only: a file cut short or not safetensors at all fails here
                with safe_open(f, framework="pt"):
                    pass
            except Exception as e:
                raise ConfigError(f"model.name: {f} is not a readable safetensors file ({_reason(e)})") from None


def _remote_code_notice(m: ModelConfig, loading: bool) -> None:
    name = m.name
    auto_map = None
    if looks_local(name) and (Path(name).expanduser() / "config.json").is_file():
        try:
            auto_map = json.loads((Path(name).expanduser() / "config.json").read_text(encoding="utf-8")).get("auto_map")
        except (OSError, ValueError, AttributeError):
            pass
    files = sorted({str(v).split(".")[0] + ".py" for v in auto_map.values() if isinstance(v, str)}) \
        if isinstance(auto_map, dict) else []
    shipped = f" ({', '.join(files)}, named in its config.json auto_map)" if files else ""
    if loading:
        print(f"samsum_tuner: warning: model.trust_remote_code=true: loading {name} runs the Python code it "
              f"ships{shipped}; use it only with a model you trust", flush=True)
    else:
        print(f"samsum_tuner: note: model.trust_remote_code=true: a training run would run the Python code that "
              f"{name} ships{shipped}; a dry run or a plan runs none of it", flush=True)


def _check_architecture(m: ModelConfig, config, lora_targets: list[str] | None) -> None:
    """A causal LM, whose modules hold every LoRA target: the model is built on the meta device (shapes only, no
    memory, no weights) and its module names compared, as peft matches them (the full name or its last parts)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM

    name = m.name
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(f"model.name: {name} is a {config.model_type} model, which transformers has no causal-LM "
                          "class for")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # values the config class accepts and its model cannot build with (0 KV heads, an act)
        raise ConfigError(f"model.name: {name}/config.json: the model cannot be built from it: {_reason(e)}") from None
    if not lora_targets:
        return
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in lora_targets
               if t != "all-linear" and not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"lora.target_modules: {', '.join(missing)} not in {name}; its linear layers are "
                          f"{', '.join(linear)}")


def load_model_config(m: ModelConfig):
    """The model's config without its weights (the planner's input)."""
    from transformers import AutoConfig, LlamaConfig

    name = m.name
    shape = random_shape_name(name)
    if shape is not None:
        s = shape_for_model_name(name)
        return LlamaConfig(
            vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
            num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
            num_key_value_heads=s.num_key_value_heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        )
    if name == EMBEDDED:
        return AutoConfig.from_pretrained(embedded_model_dir())
    return AutoConfig.from_pretrained(
        name, revision=m.revision, trust_remote_code=m.trust_remote_code
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def load_tokenizer(m: ModelConfig, *, run_code: bool = True, local_files_only: bool = False):
    """The model's tokenizer. run_code=False (dry runs, plans) runs no code from the model's folder, whatever
    model.trust_remote_code says; local_files_only: from the hub cache alone (an unreachable hub is otherwise
    retried for every file)."""
    from transformers import AutoTokenizer

    name = m.name
    if name == EMBEDDED or random_shape_name(name) is not None:
        # random: shapes borrow SmolLM2's tokenizer (vocab 49,152 instead of Llama-2's 32,000).
        return embedded_tokenizer()
    trust = m.trust_remote_code and run_code
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=m.revision, trust_remote_code=trust,
                                                  local_files_only=local_files_only)
    except Exception as e:  # no tokenizer files, a corrupt tokenizer.json, a tokenizer that is code
        folder = Path(name).expanduser()
        reason = (f"no {', '.join(TOKENIZER_FILES)}" if looks_local(name) and folder.is_dir()
                  and not any((folder / f).is_file() for f in TOKENIZER_FILES) else _reason(e))
        hint = ("; a dry run or a plan runs none of the model's own code, which this tokenizer may need"
                if m.trust_remote_code and not trust else "")
        raise ConfigError(f"model.name: cannot load a tokenizer from {name} ({reason}){hint}") from None
    if tokenizer.pad_token is None:
        # Safe because padded label positions are masked by position, not by pad id (EOS stays supervised).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
