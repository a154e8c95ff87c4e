"""The model ready for the Trainer, as a ModelLoad says: loaded (a hub id, a local folder, the embedded SmolLM2) or
built with random weights in a real Llama shape; then bitsandbytes 4/8-bit, LoRA and regional compilation, all
through transformers and peft."""
from __future__ import annotations

import os
import time
import types
from dataclasses import dataclass
from typing import Any

import torch

from .config import ModelConfig
from .errors import ConfigError
from .hub import cache_dir
from .model_source import load_model_config
from .shapes import random_shape_name, shape_from_config
from .smollm2 import EMBEDDED, embedded_model_dir
from .varlen import VARLEN, register as register_varlen


# ---------------------------------------------------------------- precision
def layers_to_wrap(m: ModelConfig) -> list[str]:
    """The decoder-layer classes FSDP wraps, from the model class alone (no weights)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    config = load_model_config(m)
    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    return list(getattr(cls, "_no_split_modules", None) or ["LlamaDecoderLayer"])


def _build_context(load: ModelLoad):
    """Where a random model is built. Under FSDP with cpu_ram_efficient_loading, rank 0 builds it on the host and
    broadcasts it, and the other ranks build shapes only (real buffers: accelerate re-registers the rotary
    inv_freq from each rank's copy), so no card holds the whole model before sharding. A 4-bit model stays on its
    GPU: bitsandbytes keeps the quant_state beside the data there."""
    rank0_loads = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "").lower() in ("1", "true")
    if not load.fsdp or load.quantization is not None or not rank0_loads:
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
@dataclass(frozen=True)
class ModelLoad:
    """What loading the model takes, resolved from the recipe (resolve.model_load)."""

    model: ModelConfig  # which model; its attention, compilation, revision, remote code
    dtype: torch.dtype  # of the weights as built or loaded (the compute dtype when quantized)
    quantization: Any = None  # transformers.BitsAndBytesConfig, or None
    lora: Any = None  # peft.LoraConfig, or None: full fine-tuning
    autocast_adapter_dtype: bool = True  # peft's get_peft_model argument: fp32 adapters over 16-bit weights
    fsdp: bool = False  # sharded by FSDP: no device_map, rank 0 loads
    gpu_limit_gib: float | None = None  # memory.gpu_limit_gib, which random weights are drawn under


def load_model(load: ModelLoad):
    """The model ready for the Trainer: dtype, quantization, checkpointing and LoRA applied."""
    if load.model.attn_implementation == VARLEN:  # ours: transformers accepts the name once registered
        register_varlen()
    if random_shape_name(load.model.name) is not None:
        model = _build_random(load)
    else:
        model = _load_pretrained(load)
    model.config.use_cache = False  # training; also required for correct padding-free attention
    _materialize_meta_parameters(model)
    model = apply_adapters(model, load)
    if torch.cuda.is_available():
        use_compile_cache()
    if compiles(load.model):
        m = load.model
        if m.compile_scope == "model":
            n = compile_stack(model, layers_to_wrap(m), m.compile_mode)
            what = f"the decoder stack compiled as one graph over {n} layers"
        else:
            n = compile_layers(model, layers_to_wrap(m), m.compile_mode)
            what = f"{n} decoder layers compiled in place"
        print(f"samsum_tuner: {what} (model.compile={m.compile}; compiled at the first step, once per input shape)",
              flush=True)
    return model


def compiles(m: ModelConfig) -> bool:
    """Whether model.compile compiles here: true, or auto on a machine with CUDA."""
    return torch.cuda.is_available() if m.compile == "auto" else bool(m.compile)


def use_compile_cache() -> None:
    """torch.compile's caches (inductor's FX graphs, AOTAutograd's, Triton's kernels) under samsum_tuner's cache
    folder rather than /tmp, which many systems empty at boot: a later run of the same shapes loads its kernels
    instead of compiling them again. A TORCHINDUCTOR_CACHE_DIR already set is left as it is."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "torch_compile"))


def compile_layers(model, layer_classes: list[str], mode: str | None = None) -> int:
    """Regional compilation, as accelerate's compile_regions_fsdp2 and torchtitan do it: Module.compile() in
    place keeps each layer's identity, so PEFT's wrappers, gradient checkpointing and FSDP's per-layer hooks
    (installed later) still see the same modules; the lm_head and the loss stay eager, so the supervised
    positions (a different count every step) never reach a compiled graph as a dynamic shape."""
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    for layer in layers:
        layer.compile(mode=mode)
    return len(layers)


def compile_stack(model, layer_classes: list[str], mode: str | None = None, **options) -> int:
    """The module holding the decoder layers (LlamaModel), compiled in place as one graph, its layers' forward
    marked as a nested compile region: inductor compiles the layer once and the graph calls it for every layer.
    Each step enters compiled code once (and CUDA graphs, with mode=reduce-overhead, capture the whole stack); the
    first step takes longer to compile than compile_layers' (docs/throughput.md). The lm_head and the loss stay
    eager, as with compile_layers."""
    stack, layers = next(((m, c) for m in model.modules() for c in m.children()
                          if isinstance(c, torch.nn.ModuleList) and len(c) and type(c[0]).__name__ in layer_classes),
                         (None, None))
    if stack is None:
        raise ConfigError(f"model.compile_scope=model: no module of this model holds its {'/'.join(layer_classes)} "
                          "layers in a list: set model.compile_scope=layers")
    # One marked function per layer class, bound to each layer (the class itself is left as it is): every call
    # reuses the region compiled at the first, and outside torch.compile it runs the class's forward unchanged.
    regions: dict[type, Any] = {}
    for layer in layers:
        region = regions.setdefault(type(layer), torch.compiler.nested_compile_region(type(layer).forward))
        layer.forward = types.MethodType(region, layer)
    stack.compile(mode=mode, **options)  # options: torch.compile's others (the tests' CPU backend)
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


def pretrained_kwargs(load: ModelLoad) -> dict:
    """Keyword arguments for `from_pretrained`: dtype, quantization and device placement."""
    m = load.model
    kwargs = dict(dtype=load.dtype, attn_implementation=m.attn_implementation, revision=m.revision,
                  trust_remote_code=m.trust_remote_code)
    if load.quantization is not None:
        kwargs["quantization_config"] = load.quantization
        # Under FSDP no device_map: accelerate places shards (device_map="auto" caused the original's
        # "Inconsistent compute_device and device_id").
        if not load.fsdp:
            kwargs["device_map"] = {"": _local_device()}
    return kwargs


def _load_pretrained(load: ModelLoad):
    from transformers import AutoModelForCausalLM

    name = embedded_model_dir() if load.model.name == EMBEDDED else load.model.name
    return AutoModelForCausalLM.from_pretrained(name, **pretrained_kwargs(load))


def _build_random(load: ModelLoad):
    """Real Llama-2 shapes, random init, built in-process directly in the target dtype and device."""
    from transformers import AutoModelForCausalLM

    config = load_model_config(load.model)
    config._attn_implementation = load.model.attn_implementation
    dtype = load.dtype
    start = time.perf_counter()
    context = _build_context(load)
    draw_on = _draw_device(context, config, dtype, load.gpu_limit_gib)

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
    if load.quantization is not None:
        quantize_linears(model, load.quantization)
    print(f"samsum_tuner: {load.model.name} built with random weights ({n / 1e9:.2f}B parameters): "
          f"SmolLM2's vocab of {config.vocab_size:,} instead of Llama-2's 32,000, about +2%", flush=True)
    return model


def quantize_linears(model, q) -> None:
    """bitsandbytes layers, as the BitsAndBytesConfig `q` says, for an in-memory model (from_pretrained quantizes
    only while loading files)."""
    import bitsandbytes as bnb

    bits, cdtype, storage = (4 if q.load_in_4bit else 8), q.bnb_4bit_compute_dtype, q.bnb_4bit_quant_storage
    for parent in list(model.model.layers.modules()):
        for child_name, lin in list(parent.named_children()):
            if type(lin) is not torch.nn.Linear:
                continue
            device = lin.weight.device
            w = lin.weight.data.to("cpu")
            if bits == 4:
                new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                        compute_dtype=cdtype, compress_statistics=q.bnb_4bit_use_double_quant,
                                        quant_type=q.bnb_4bit_quant_type, quant_storage=storage, device="meta")
                # module=new: the layer keeps the quant_state, so bitsandbytes restores it after FSDP
                # re-wraps the parameter (otherwise "quant_state is required" at the first forward).
                new.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=q.bnb_4bit_use_double_quant,
                                               quant_type=q.bnb_4bit_quant_type, quant_storage=storage, module=new)
            else:
                new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                          has_fp16_weights=False, device="meta")
                new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
            if lin.bias is not None:
                new.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
            setattr(parent, child_name, new.to(device))
    # peft's prepare_model_for_kbit_training reads these flags.
    model.is_loaded_in_4bit = bits == 4
    model.is_loaded_in_8bit = bits == 8


def apply_adapters(model, load: ModelLoad):
    from peft import get_peft_model, prepare_model_for_kbit_training

    if load.quantization is not None:
        # Checkpointing is the Trainer's to switch on (resolve.training_arguments), as for every other model.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if load.lora is None:
        return model
    return get_peft_model(model, load.lora, autocast_adapter_dtype=load.autocast_adapter_dtype)


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
