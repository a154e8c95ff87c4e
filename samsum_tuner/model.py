"""Tokenizer and model: hub id, local folder, the embedded SmolLM2 GGUF, or a random Llama-2 shape.

Then dtype, bitsandbytes 4/8-bit, LoRA and gradient checkpointing, all through transformers/peft.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .config import Recipe
from .errors import ConfigError
from .hub import cache_dir, hub_problem, in_hub_cache
from .shapes import LLAMA_SHAPES, RANDOM_PREFIX, random_shape_name, shape_for_model_name, shape_from_config
from .smollm2 import EMBEDDED, embedded_model_dir, embedded_model_dir_cached, embedded_tokenizer, smollm2_gguf

DTYPES = {None: torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------- where the model comes from
def looks_local(name: str) -> bool:
    """A local folder rather than a hub id: a path-like name, or one that exists on disk."""
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


LOCAL_HINT = (f"point model.name at a local HF folder (config.json + weights), or use {EMBEDDED} or "
              "random:llama2-7b / random:llama2-13b")


def check_model_source(recipe: Recipe) -> None:
    """Refuse a model that is not there, before anything heavy happens (for a folder: a stat)."""
    name = recipe.model.name
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

        m = recipe.model
        why = (None if in_hub_cache(m.name, ("config.json",), revision=m.revision)
               else hub_problem(m.name, "config.json", constants.HF_HUB_OFFLINE, revision=m.revision))
        if why:  # at once, where the download below would retry an unreachable hub for ~25 s
            raise ConfigError(f"model.name: cannot reach '{m.name}' ({why}); {LOCAL_HINT}")
        _hub_config(recipe)


def check_model(recipe: Recipe, *, loading: bool = False) -> None:
    """The model as far as it can be checked without its weights or code from its folder: config.json, a causal-LM
    class and the recipe's LoRA targets (after check_model_source). `loading`: the weights load next (a training
    run, not a dry run or a plan), so they must be there too; with trust_remote_code, a warning says whose code runs."""
    check_model_source(recipe)
    name = recipe.model.name
    if random_shape_name(name) is not None:
        config = load_model_config(recipe)
    elif name == EMBEDDED:
        from transformers import LlamaConfig

        # Before its first conversion only the module names matter here, and SmolLM2 is a Llama.
        config = load_model_config(recipe) if embedded_model_dir_cached() else LlamaConfig(num_hidden_layers=1)
    elif looks_local(name):
        config = _local_config(recipe, Path(name).expanduser())
        if loading:
            _check_weight_files(Path(name).expanduser())
    else:
        config = _hub_config(recipe)
    if recipe.model.trust_remote_code and random_shape_name(name) is None and name != EMBEDDED:
        _remote_code_notice(recipe, loading)
    if config is not None:
        _check_architecture(recipe, config)


def _reason(e: Exception) -> str:
    """A library's message on one line, cut short."""
    text = " ".join(str(e).split())
    return (text[:200] + "...") if len(text) > 200 else text or type(e).__name__


def _local_config(recipe: Recipe, path: Path):
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
        if own_config and recipe.model.trust_remote_code:
            return None
        if own_config:
            raise ConfigError(f"model.name: {path} defines its architecture in its own Python code (config.json "
                              "auto_map); set model.trust_remote_code=true only if you trust that code")
        if not isinstance(model_type, str) or not model_type:
            raise ConfigError(f"model.name: {f} has no model_type (e.g. \"llama\")")
        import transformers

        raise ConfigError(f"model.name: {f}: unknown model_type '{model_type}' (transformers "
                          f"{transformers.__version__} has no such architecture)")
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    _check_sizes(f, {k: raw[k] for k in sizes if k in raw})  # before transformers divides by them
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # wrong types, values transformers' own config validation refuses
        raise ConfigError(f"model.name: {f}: {_reason(e)}") from None
    _check_sizes(f, {k: getattr(config, k) for k in sizes if getattr(config, k, None) is not None})  # aliases too
    if recipe.model.trust_remote_code and isinstance(auto_map, dict) and "AutoModelForCausalLM" in auto_map:
        return None  # the model class is the folder's own: its module names are unknown until its code runs
    return config


def _check_sizes(f: Path, sizes: dict) -> None:
    for key, value in sizes.items():
        if type(value) is not int or value <= 0:
            raise ConfigError(f"model.name: {f}: {key} must be a positive integer, got {value!r}"[:300])


def _hub_config(recipe: Recipe):
    """A hub model's config, read without running its code; None when it is code the recipe trusts."""
    from transformers import AutoConfig

    name = recipe.model.name
    try:
        return AutoConfig.from_pretrained(name, revision=recipe.model.revision, trust_remote_code=False)
    except Exception as e:  # offline, gated, misspelt, or code the recipe does (not) trust
        if recipe.model.trust_remote_code and "trust_remote_code" in str(e):
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


def _remote_code_notice(recipe: Recipe, loading: bool) -> None:
    name = recipe.model.name
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


def _check_architecture(recipe: Recipe, config) -> None:
    """A causal LM, whose modules hold every LoRA target: the model is built on the meta device (shapes only, no
    memory, no weights) and its module names compared, as peft matches them (the full name or its last parts)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM

    name = recipe.model.name
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(f"model.name: {name} is a {config.model_type} model, which transformers has no causal-LM "
                          "class for")
    if not recipe.lora.enabled:
        return
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in recipe.lora.target_modules
               if t != "all-linear" and not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"lora.target_modules: {', '.join(missing)} not in {name}; its linear layers are "
                          f"{', '.join(linear)}")


def load_model_config(recipe: Recipe):
    """The model's config without its weights (the planner's input)."""
    from transformers import AutoConfig, LlamaConfig

    name = recipe.model.name
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
        name, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def load_tokenizer(recipe: Recipe, *, run_code: bool = True, local_files_only: bool = False):
    """The model's tokenizer. run_code=False (dry runs, plans) runs no code from the model's folder, whatever
    model.trust_remote_code says; local_files_only: from the hub cache alone (an unreachable hub is otherwise
    retried for every file)."""
    from transformers import AutoTokenizer

    name = recipe.model.name
    if name == EMBEDDED or random_shape_name(name) is not None:
        # random: shapes borrow SmolLM2's tokenizer (vocab 49,152 instead of Llama-2's 32,000).
        return embedded_tokenizer()
    trust = recipe.model.trust_remote_code and run_code
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=recipe.model.revision, trust_remote_code=trust,
                                                  local_files_only=local_files_only)
    except Exception as e:  # no tokenizer files, a corrupt tokenizer.json, a tokenizer that is code
        folder = Path(name).expanduser()
        reason = (f"no {', '.join(TOKENIZER_FILES)}" if looks_local(name) and folder.is_dir()
                  and not any((folder / f).is_file() for f in TOKENIZER_FILES) else _reason(e))
        hint = ("; a dry run or a plan runs none of the model's own code, which this tokenizer may need"
                if recipe.model.trust_remote_code and not trust else "")
        raise ConfigError(f"model.name: cannot load a tokenizer from {name} ({reason}){hint}") from None
    if tokenizer.pad_token is None:
        # Safe because padded label positions are masked by position, not by pad id (EOS stays supervised).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------- precision
def compute_dtype(recipe: Recipe) -> torch.dtype:
    t = recipe.train
    if t.fp16:
        return torch.float16
    if t.bf16:
        return torch.bfloat16
    return DTYPES[recipe.model.dtype]


def layers_to_wrap(recipe: Recipe) -> list[str]:
    """The decoder-layer classes FSDP wraps, from the model class alone (no weights)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    config = load_model_config(recipe)
    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    return list(getattr(cls, "_no_split_modules", None) or ["LlamaDecoderLayer"])


def _build_context(recipe: Recipe, fsdp: bool):
    """Where a random model is built. Under FSDP with cpu_ram_efficient_loading, rank 0 builds it on the host and
    broadcasts it, and the other ranks build shapes only (real buffers: accelerate re-registers the rotary
    inv_freq from each rank's copy), so no card holds the whole model before sharding. A 4-bit model stays on its
    GPU: bitsandbytes keeps the quant_state beside the data there."""
    rank0_loads = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "").lower() in ("1", "true")
    if not fsdp or recipe.quantization.bits or not rank0_loads:
        # Without cpu_ram_efficient_loading nothing broadcasts rank 0's weights: every rank builds its own.
        return _local_device()
    if int(os.environ.get("RANK", 0)) == 0:
        return torch.device("cpu")
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def _draw_device(context, config, dtype: torch.dtype, limit_gib: float | None):
    """Where the random values are drawn: on the GPU and copied down to rank 0's host copy when the whole model
    fits free on the card (and under memory.gpu_limit_gib), because drawing 7-13B values on the host takes
    minutes (timings in docs/planner.md); otherwise on the host. The transient precedes every reported peak."""
    if not (isinstance(context, torch.device) and context.type == "cpu" and torch.cuda.is_available()):
        return context
    gpu = _local_device()
    need = shape_from_config(config).n_params * torch.finfo(dtype).bits // 8
    room = torch.cuda.mem_get_info(gpu)[0]
    if limit_gib:  # memory.gpu_limit_gib caps this process below what the card has free
        room = min(room, limit_gib * 2**30 - torch.cuda.memory_reserved(gpu))
    return gpu if room > 1.1 * need else context


def _local_device() -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


# ---------------------------------------------------------------- loading
def load_model(recipe: Recipe, *, fsdp: bool = False):
    """The model ready for the Trainer: dtype, quantization, checkpointing and LoRA applied."""
    dtype = compute_dtype(recipe) if recipe.quantization.bits else DTYPES[recipe.model.dtype]
    if random_shape_name(recipe.model.name) is not None:
        model = _build_random(recipe, dtype, fsdp)
    else:
        model = _load_pretrained(recipe, fsdp)
    model.config.use_cache = False  # training; also required for correct padding-free attention
    _materialize_meta_parameters(model)
    model = apply_adapters(recipe, model)
    if torch.cuda.is_available():
        use_compile_cache()
    if compiles(recipe):
        n = compile_layers(model, layers_to_wrap(recipe))
        print(f"samsum_tuner: {n} decoder layers compiled in place (model.compile={recipe.model.compile}; they "
              "compile at the first step, once per input shape)", flush=True)
    return model


def compiles(recipe: Recipe) -> bool:
    """Whether model.compile compiles here: true, or auto on a machine with CUDA."""
    return torch.cuda.is_available() if recipe.model.compile == "auto" else bool(recipe.model.compile)


def use_compile_cache() -> None:
    """torch.compile's caches (inductor's FX graphs, AOTAutograd's, Triton's kernels) under samsum_tuner's cache
    folder rather than /tmp, which many systems empty at boot: a later run of the same shapes loads its kernels
    instead of compiling them again. A TORCHINDUCTOR_CACHE_DIR already set is left as it is."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "torch_compile"))


def compile_layers(model, layer_classes: list[str]) -> int:
    """Regional compilation, as accelerate's compile_regions_fsdp2 and torchtitan do it: Module.compile() in
    place keeps each layer's identity, so PEFT's wrappers, gradient checkpointing and FSDP's per-layer hooks
    (installed later) still see the same modules; the lm_head and the loss stay eager, so the supervised
    positions (a different count every step) never reach a compiled graph as a dynamic shape."""
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    for layer in layers:
        layer.compile()
    return len(layers)


def _materialize_meta_parameters(model) -> None:
    """Give parameters that hold only a shape (FSDP ranks other than 0) real but untouched host storage.

    accelerate maps optimizer slots to sharded parameters by data_ptr(), which is 0 for every meta tensor: those
    ranks would silently train the wrong weights (accelerate#3930). Untouched torch.empty pages cost no memory."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                module._parameters[name] = torch.nn.Parameter(torch.empty_like(param, device="cpu"),
                                                              requires_grad=param.requires_grad)


def _bnb_config(recipe: Recipe, cdtype: torch.dtype, fsdp: bool):
    from transformers import BitsAndBytesConfig

    q = recipe.quantization
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=cdtype,
        # FSDP flattens parameters of one dtype: 4-bit storage must be the compute dtype (fsdp_qlora).
        bnb_4bit_quant_storage=cdtype if fsdp else torch.uint8,
    )


def pretrained_kwargs(recipe: Recipe, *, fsdp: bool) -> dict:
    """Keyword arguments for `from_pretrained`: dtype, quantization and device placement."""
    weights_dtype, cdtype = DTYPES[recipe.model.dtype], compute_dtype(recipe)
    kwargs = dict(
        dtype=cdtype if recipe.quantization.bits else weights_dtype,
        attn_implementation=recipe.model.attn_implementation,
        revision=recipe.model.revision,
        trust_remote_code=recipe.model.trust_remote_code,
    )
    if recipe.quantization.bits:
        kwargs["quantization_config"] = _bnb_config(recipe, cdtype, fsdp)
        # Under FSDP no device_map: accelerate places shards (device_map="auto" caused the original's
        # "Inconsistent compute_device and device_id").
        if not fsdp:
            kwargs["device_map"] = {"": _local_device()}
    return kwargs


def _load_pretrained(recipe: Recipe, fsdp: bool):
    from transformers import AutoModelForCausalLM

    name = embedded_model_dir() if recipe.model.name == EMBEDDED else recipe.model.name
    return AutoModelForCausalLM.from_pretrained(name, **pretrained_kwargs(recipe, fsdp=fsdp))


def _build_random(recipe: Recipe, dtype: torch.dtype, fsdp: bool):
    """Real Llama-2 shapes, random init, built in-process directly in the target dtype and device."""
    from transformers import AutoModelForCausalLM

    config = load_model_config(recipe)
    config._attn_implementation = recipe.model.attn_implementation
    start = time.perf_counter()
    context = _build_context(recipe, fsdp)
    draw_on = _draw_device(context, config, dtype, recipe.memory.gpu_limit_gib)

    def draw(where):
        with where:
            return AutoModelForCausalLM.from_config(config, dtype=dtype)

    try:
        model = draw(draw_on)
    except torch.OutOfMemoryError:  # the card filled up after the check: the host draws after all
        if draw_on is context:
            raise
        torch.cuda.empty_cache()
        draw_on = context
        model = draw(context)
    if draw_on is not context:
        model.to(context)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # the transient is no part of any peak reported later
    n = sum(p.numel() for p in model.parameters())
    where = draw_on if isinstance(draw_on, torch.device) else "no device (shapes only: rank 0's values are broadcast)"
    print(f"samsum_tuner: weights drawn on {where} in {time.perf_counter() - start:.1f} s", flush=True)
    if recipe.quantization.bits:
        quantize_linears(model, recipe, compute_dtype(recipe), fsdp)
    print(f"samsum_tuner: {recipe.model.name} built with random weights ({n / 1e9:.2f}B parameters): "
          f"SmolLM2's vocab of {config.vocab_size:,} instead of Llama-2's 32,000, about +2%", flush=True)
    return model


def quantize_linears(model, recipe: Recipe, cdtype: torch.dtype, fsdp: bool) -> None:
    """bitsandbytes layers for an in-memory model (from_pretrained quantizes only while loading files)."""
    import bitsandbytes as bnb

    q = recipe.quantization
    storage = cdtype if fsdp else torch.uint8
    for parent in list(model.model.layers.modules()):
        for child_name, lin in list(parent.named_children()):
            if type(lin) is not torch.nn.Linear:
                continue
            device = lin.weight.device
            w = lin.weight.data.to("cpu")
            if q.bits == 4:
                new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                        compute_dtype=cdtype, compress_statistics=q.double_quant,
                                        quant_type=q.quant_type, quant_storage=storage, device="meta")
                # module=new: the layer keeps the quant_state, so bitsandbytes restores it after FSDP
                # re-wraps the parameter (otherwise "quant_state is required" at the first forward).
                new.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=q.double_quant,
                                               quant_type=q.quant_type, quant_storage=storage, module=new)
            else:
                new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                          has_fp16_weights=False, device="meta")
                new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
            if lin.bias is not None:
                new.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
            setattr(parent, child_name, new.to(device))
    # peft's prepare_model_for_kbit_training reads these flags.
    model.is_loaded_in_4bit = q.bits == 4
    model.is_loaded_in_8bit = q.bits == 8


def apply_adapters(recipe: Recipe, model):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lo = recipe.lora
    if recipe.quantization.bits:
        # Checkpointing is the Trainer's to switch on (trainer.py), as for every other model.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if not lo.enabled:
        return model
    peft_config = LoraConfig(
        r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=list(lo.target_modules),
        bias=lo.bias, task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_config)
    return model


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) with 4-bit weights counted at their logical size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n = n * 2 * (p.element_size())  # packed: two 4-bit values per byte of storage
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
