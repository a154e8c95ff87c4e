"""The memory planner's terms: one function per thing that takes memory, in bytes, from the shape and the recipe.

docs/planner.md explains each term and the measurements behind the constants; planner.py adds them up.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import Recipe
from .shapes import ModelShape, target_names

GIB = 2**30

# ---------------------------------------------------------------- constants (the only tunables)
# CUDA context plus cuBLAS/cuDNN workspaces: memory the card loses before the caching allocator sees a byte.
CUDA_CONTEXT_GIB = 0.75
# NCCL communicators and their buffers, per rank, when more than one GPU takes part.
NCCL_GIB = 0.5
# The caching allocator reserves more than it hands out (block rounding, split blocks): a few percent.
FRAGMENTATION = 0.05
# Per process on the host: the interpreter, torch + CUDA runtime libraries, tokenizer and tokenized SAMSum.
HOST_BASELINE_GIB = 2.5
# CUDA's fused dropout saves a bool mask (1 byte per element); CPU's saves a noise tensor of the input dtype.
DROPOUT_MASK_BYTES = 1
# Loss: fp32 log-probabilities saved by cross_entropy (4 bytes per vocab entry per token), plus the nll and
# log-softmax gradients in backward (4 + 4).
LOGITS_BYTES_PER_VOCAB = 12
# NF4 with double quantization: 4 bits per weight, an 8-bit absmax per 64-weight block, and an fp32 scale per
# 256 absmax values. int8 (LLM.int8) is 1 byte per weight plus an fp32 scale per output row (added per layer).
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
INT8_BYTES = 1.0
# FSDP2 over several ranks: the layer being computed plus the one prefetched are unsharded at once.
FSDP_LAYERS_IN_FLIGHT = 2


@dataclass(frozen=True)
class Setup:
    """What every term reads: the recipe, the shape, and the precision and sharding they imply."""
    recipe: Recipe
    s: ModelShape
    gpus: int
    fsdp: bool
    offload: bool
    n: int  # shards of params, grads and optimizer states
    half_train: bool  # fp16/bf16 autocast
    mp: bool  # FSDP mixed precision: fp32 sharded master, half all-gathered params
    wb: int  # bytes per unquantized weight as stored
    c: int  # bytes of matmul outputs
    stream: int  # bytes of the residual stream and norm outputs
    full: bool  # full fine-tuning (no LoRA)
    lora_n: int  # LoRA adapter parameters
    adapter_b: int  # bytes per adapter element (peft's autocast_adapter_dtype: fp32)
    trainable: int
    state_b: int  # bytes per gradient and optimizer state element
    checkpointed: bool  # activation checkpointing, as training decides it (config.py)
    compiled: bool  # decoder layers compiled: model.compile true, or auto on CUDA

    @property
    def bits(self) -> int | None:
        return self.recipe.quantization.bits

    @property
    def shard(self) -> str:
        return f", 1/{self.n} shard" if self.n > 1 else ""

    @property
    def label(self) -> str:
        """How the base weights are stored, for row labels."""
        return {4: "4-bit NF4 base", 8: "int8 base"}.get(self.bits or 0,
                                                         "fp32" if self.wb == 4 else self.recipe.model.dtype)


def _weights_bytes(recipe: Recipe) -> int:
    """Bytes per element of unquantized weights as stored (None = fp32, as the original loaded them)."""
    return 2 if recipe.model.dtype in ("bfloat16", "float16") else 4


def setup(recipe: Recipe, gpus: int, s: ModelShape, device: str = "cuda") -> Setup:
    """The Setup of `recipe` on `gpus` processes for shape `s`, on CUDA GPUs or the CPU."""
    q, lo, t, f = recipe.quantization, recipe.lora, recipe.train, recipe.fsdp
    fsdp = f.enabled
    half_train = t.fp16 or t.bf16
    mp = fsdp and half_train
    wb = _weights_bytes(recipe)
    full = not lo.enabled
    lora_n = s.lora_params(lo.target_modules, lo.r) if lo.enabled else 0
    # Without peft's autocast_adapter_dtype, adapters take the dtype of their (unquantized) base layer.
    adapter_b = wb if not lo.autocast_adapter_dtype and not q.bits else 4
    return Setup(
        recipe=recipe, s=s, gpus=gpus, fsdp=fsdp, offload=f.enabled and f.cpu_offload,
        n=gpus if fsdp and f.sharding_strategy != "NO_SHARD" else 1, half_train=half_train, mp=mp, wb=wb,
        c=2 if half_train or wb == 2 else 4, stream=2 if mp or (not q.bits and wb == 2) else 4, full=full,
        lora_n=lora_n, adapter_b=adapter_b, trainable=s.n_params if full else lora_n,
        # pure half params keep half grads and states, adapters those of their dtype
        state_b=(wb if not q.bits else 4) if full else adapter_b,
        checkpointed=recipe.checkpoints_activations,
        compiled=recipe.model.compile is True or (recipe.model.compile == "auto" and device == "cuda"),
    )


# ---------------------------------------------------------------- parameters and their states
def stored_weights(su: Setup) -> tuple[float, float]:
    """(all weights as stored before sharding, one decoder layer as FSDP gathers it)."""
    s, L, h = su.s, su.s.num_hidden_layers, su.s.hidden_size
    P, lin = s.n_params, s.linear_params()
    if su.bits:
        per_linear = NF4_BYTES if su.bits == 4 else INT8_BYTES
        scales = 0 if su.bits == 4 else 4 * L * sum(o for _, o in s.linear_dims().values())
        # prepare_model_for_kbit_training upcasts everything not quantized (embeddings, norms, lm_head) to fp32.
        return lin * per_linear + scales + (P - lin) * 4, (lin * per_linear + scales) / L + 2 * h * 4
    return P * su.wb, s.layer_params * (su.c if su.mp else su.wb)


def weight_rows(su: Setup, weights: float) -> list[tuple[str, float, bool]]:
    """Weights and LoRA adapters on the GPU, sharded (none under CPU offload)."""
    if su.offload:
        return []
    rows = [(f"weights ({su.label}{su.shard})", weights / su.n, True)]
    if su.lora_n:
        rows.append((f"LoRA adapters ({'fp32' if su.adapter_b == 4 else su.recipe.model.dtype})",
                     su.lora_n * su.adapter_b / su.n, True))
    return rows


def gradient_bytes(su: Setup) -> int:
    """Accumulated gradients of every trainable parameter, before sharding."""
    return su.trainable * su.state_b


def optimizer_bytes(recipe: Recipe, trainable: int, state_bytes: int) -> tuple[float, float, str]:
    """(optimizer state bytes, step workspace bytes, name) for the trainable parameters."""
    t = recipe.train
    name = t.optim.lower()
    if name == "sgd":
        return (trainable * state_bytes if t.momentum > 0 else 0), 0, "SGD momentum" if t.momentum > 0 else "SGD"
    if "8bit" in name:
        return trainable * 2, 0, "8-bit AdamW states"  # two uint8 states; bitsandbytes steps tensor by tensor
    # torch AdamW (foreach): exp_avg + exp_avg_sq, and the step builds sqrt(exp_avg_sq) for every parameter at
    # once, one more full-size temporary (none with the fused kernel).
    workspace = 0 if "fused" in name else trainable * state_bytes
    return 2 * trainable * state_bytes, workspace, "AdamW states"


def gradient_and_optimizer_rows(su: Setup, grads: float, opt_states: float,
                                opt_name: str) -> list[tuple[str, float, bool]]:
    """Gradients, optimizer states and DDP's buckets on the GPU (none under CPU offload)."""
    if su.offload:
        return []
    rows = [(f"gradients ({'fp32' if su.state_b == 4 else 'half'}{su.shard})", grads / su.n, True)]
    if opt_states:
        rows.append((f"optimizer: {opt_name}{su.shard}", opt_states / su.n, True))
    if su.gpus > 1 and not su.fsdp:
        rows.append(("DDP gradient buckets", grads, True))
    return rows


def gradient_in_flight_rows(su: Setup) -> list[tuple[str, float, bool]]:
    """Full fine-tuning: one gradient beyond the accumulated ones, FSDP's unsharded layer before reduce-scatter
    or the fresh gradient of the largest tensor (lm_head) before it is added to .grad."""
    if not su.full:
        return []
    s, state_b = su.s, su.state_b
    in_flight = s.layer_params * (su.c if su.mp else state_b) if su.fsdp else s.vocab_size * s.hidden_size * state_b
    return [("gradient in flight (one layer or lm_head)", in_flight, False)]


def unsharded_gradient_rows(su: Setup, grads: float) -> list[tuple[str, float, bool]]:
    """FSDP under the Trainer's no_sync (accumulation without reduce_every_micro_batch): every layer's gradient
    stays unsharded, in the reduce dtype, until the last micro-batch; counted beyond the shards."""
    f = su.recipe.fsdp
    if not (su.fsdp and su.recipe.train.gradient_accumulation_steps > 1 and not f.reduce_every_micro_batch):
        return []
    extra = su.trainable * (su.c if su.mp else su.state_b) - (0 if su.offload else grads / su.n)
    if extra <= 0:
        return []
    return [("gradients held unsharded between micro-batches (fsdp.reduce_every_micro_batch=false), "
             "beyond the shards", extra, False)]


def autocast_copy_rows(su: Setup) -> list[tuple[str, float, bool]]:
    """Autocast casts each fp32 weight to half per use, and autograd keeps the copies until backward."""
    if not (su.half_train and not su.mp and su.wb == 4 and not su.bits):
        return []
    s = su.s
    return [("autocast half copies of fp32 weights",
             (s.linear_params() + s.vocab_size * s.hidden_size + su.lora_n) * 2, False)]


def fsdp_unsharded_rows(su: Setup, layer_bytes: float, logits: float) -> list[tuple[str, float, bool]]:
    """What FSDP2 holds unsharded at the peak: the layers in flight plus final norm and lm_head, which stay
    unsharded from the end of forward into backward (one rank: no prefetch, the larger of that and one layer)."""
    if not su.fsdp:
        return []
    s, L = su.s, su.s.num_hidden_layers
    tail = (s.vocab_size * s.hidden_size + s.hidden_size) * (su.c if su.mp else 4 if su.bits else su.wb)
    if su.recipe.fsdp.sharding_strategy == "SHARD_GRAD_OP":  # no reshard after forward: all wait for backward
        layers, unsharded = L, L * layer_bytes + tail
    elif su.gpus > 1:
        layers, unsharded = FSDP_LAYERS_IN_FLIGHT, FSDP_LAYERS_IN_FLIGHT * layer_bytes + tail
    else:  # the first layer of backward is unsharded only after the tail is resharded and the logits freed
        layers, unsharded = 0, max(tail, layer_bytes - logits)
    if layers:
        held = f"{layers} layer(s) + final norm/lm_head"
    else:
        held = f"{'final norm/lm_head' if unsharded == tail else 'one layer'} (1 rank, no prefetch)"
    return [(f"FSDP unsharded ({'half' if su.mp else 'as stored'}): {held}", unsharded, False)]


# ---------------------------------------------------------------- what grows with the batch
def layer_activation_bytes(shape: ModelShape, *, full: bool, compute: int, stream: int, autocast: bool,
                           quant_bits: int | None = None, lora_targets=(), lora_r: int = 8, lora_dropout: float = 0.05,
                           mask_bytes: int = DROPOUT_MASK_BYTES, compiled: bool = False) -> float:
    """Bytes autograd saves per token in one decoder layer (transformers' LlamaDecoderLayer, sdpa).

    compute: bytes of matmul outputs (2 under autocast or half weights); stream: bytes of the residual stream
    and norm outputs (4 when weights are fp32, the norms' included). Checked tensor by tensor (docs/planner.md).
    compiled: the layer compiled (model.compile), whose forward/backward split saves less (below).
    """
    h, i, kv = shape.hidden_size, shape.intermediate_size, shape.kv_dim
    q = shape.q_dim
    c = compute
    if compiled:
        return _compiled_layer_bytes(shape, full, c, stream, lora_targets if not full else (), lora_r,
                                     lora_dropout, 4 if not autocast else c)
    # RMSNorm upcasts to fp32 and saves that copy (4h) for its backward, per norm; a trainable scale also
    # saves the normalized input in the stream dtype.
    total = 2 * (4 * h + (stream * h if full else 0))
    # sdpa (flash / memory-efficient) saves q, k, v after RoPE, its output and a per-head logsumexp.
    total += c * (q + 2 * kv) + c * q + 4 * shape.num_attention_heads
    # bitsandbytes 4-bit layers return their input's dtype (fp32: prepare_model_for_kbit_training upcasts the
    # norms), so the MLP's saved tensors are fp32; 8-bit layers return the autocast dtype.
    mlp = stream if quant_bits == 4 else c
    total += 3 * mlp * i  # gate output (SiLU input), SiLU output, up output (both kept by the product)
    if full:
        # Weight gradients need each projection's input. Autocast casts it per projection when the stream is
        # fp32 (q, k, v: three copies; gate, up: two); o_proj's input is the sdpa output, already counted.
        casts_attn, casts_mlp = (3, 2) if autocast and stream != c else (1, 1)
        total += c * h * (casts_attn + casts_mlp) + c * i  # + down_proj's input
    for name in target_names(lora_targets) if lora_targets else ():
        d = shape.linear_dims()[name][0]
        # peft: lora_B(lora_A(dropout(x))): the dropout mask, then lora_A's input (cast to the compute dtype
        # under autocast, else the fp32 adapter dtype), then the r-dim input of lora_B.
        adapter_in = c if autocast else 4
        total += (mask_bytes * d if lora_dropout > 0 else 0) + adapter_in * d + adapter_in * lora_r
    return total


def _compiled_layer_bytes(shape: ModelShape, full: bool, c: int, stream: int, lora_targets, lora_r: int,
                          lora_dropout: float, adapter_in: int) -> float:
    """What torch.compile's min-cut partition of a decoder layer saves per token: the layer's input and the
    norms' 1/rms; q, k, v after RoPE, the attention output and its logsumexp; the MLP's gate and up outputs
    (SiLU and its product are recomputed; 4-bit layers' outputs are saved in the compute dtype on CUDA); with
    full fine-tuning the projections' inputs (each norm's output once, cast, for the projections it feeds; the
    attention output reshaped for o_proj; the down_proj input), with LoRA o_proj's output (the second norm's
    input is recomputed from it) and per adapter a 1-byte dropout mask, its input and lora_A's output."""
    h, i, kv, q = shape.hidden_size, shape.intermediate_size, shape.kv_dim, shape.q_dim
    total = stream * h + 2 * 4 + c * (q + 2 * kv) + c * q + 4 * shape.num_attention_heads + 2 * c * i
    if full:
        return total + c * q + 2 * c * h + c * i
    total += c * h
    for name in target_names(lora_targets):
        d = shape.linear_dims()[name][0]
        total += (d if lora_dropout > 0 else 0) + adapter_in * d + adapter_in * lora_r
    return total


def logits_bytes(su: Setup, positions: int, tokens: int) -> int:
    """Vocabulary-wide loss tensors at the positions whose logits are computed, plus the final norm and
    lm_head input at every position."""
    return positions * LOGITS_BYTES_PER_VOCAB * su.s.vocab_size + tokens * 8 * su.s.hidden_size


def activation_row(su: Setup, tokens: int, logits: float) -> tuple[tuple[str, float, bool], float]:
    """(the activations' row, the bytes of one layer recomputed in backward when checkpointing)."""
    s, lo, L = su.s, su.recipe.lora, su.s.num_hidden_layers
    per_layer = layer_activation_bytes(s, full=su.full, compute=su.c, stream=su.stream, autocast=su.half_train,
                                       quant_bits=su.bits, lora_targets=lo.target_modules if lo.enabled else (),
                                       lora_r=lo.r, lora_dropout=lo.dropout, compiled=su.compiled)
    # Backward recomputes one layer at a time, after the loss is freed, beside the gradient flowing through its
    # MLP (one intermediate-wide tensor).
    recomputed = (per_layer + su.c * s.intermediate_size) * tokens
    if su.checkpointed:  # each layer keeps only its input (the residual stream)
        acts = L * su.stream * s.hidden_size * tokens + max(0, recomputed - logits)
        label = f"activations, checkpointed ({L} layer inputs + 1 layer recomputed in backward; {tokens:,} tokens)"
    else:
        acts = L * per_layer * tokens
        label = (f"activations ({L} {'compiled ' if su.compiled else ''}layers x {tokens:,} tokens, "
                 f"{per_layer / 1024:.0f} KiB/token/layer)")
    return (label, acts, False), recomputed


def single_micro_batch_overlap(su: Setup, grads: float, acts: float, logits: float, recomputed: float) -> float:
    """Bytes to add to the forward/backward sum (<= 0) with one micro-batch per step: the Trainer frees .grad
    after each step, so gradients only appear as activations are freed and the peak holds the larger of the two
    (+ one recomputed layer beside the gradients when checkpointing)."""
    beside = recomputed if su.checkpointed else 0
    return max(grads / su.n + beside, acts + logits) - grads / su.n - (acts + logits)


# ---------------------------------------------------------------- fixed costs and loading
def cuda_overhead_gib(gpus: int) -> float:
    """CUDA context and cuBLAS workspaces, plus NCCL with several GPUs: outside the caching allocator."""
    return CUDA_CONTEXT_GIB + (NCCL_GIB if gpus > 1 else 0)


def random_4bit_build_gib(weights: float, lora_n: int) -> float:
    """A random 4-bit shape under FSDP is built whole on each rank's GPU (bitsandbytes quantizes there), then
    sharded."""
    return (weights + lora_n * 4) / GIB


def pinned_shard_bytes(s: ModelShape, n: int, elem: int) -> int:
    """Every parameter's 1/n shard (dim 0, as FSDP2 splits it) in pinned host memory, each block rounded up to a
    power of two by CUDA's caching host allocator."""
    def pinned(rows: int, cols: int) -> int:
        return 1 << (-(-rows // n) * cols * elem - 1).bit_length()

    layer = sum(pinned(out, inp) for inp, out in s.linear_dims().values()) + 2 * pinned(s.hidden_size, 1)
    tail = pinned(s.vocab_size, s.hidden_size) * (1 if s.tie_word_embeddings else 2) + pinned(s.hidden_size, 1)
    return s.num_hidden_layers * layer + tail


def offloaded_host_gib(su: Setup, weights: float, grads: float, opt_states: float) -> float:
    """CPU offload, per rank: FSDP2 pins the parameter shards and the gradients it copies out; optimizer states."""
    n = su.n
    pinned_w = weights / n if su.bits else pinned_shard_bytes(su.s, n, su.wb)
    pinned_g = pinned_shard_bytes(su.s, n, su.state_b) if su.full else grads / n
    return (pinned_w + su.lora_n * 4 / n + pinned_g + opt_states / n) / GIB


def host_loading(su: Setup, random: bool, every_rank: bool) -> tuple[float, str, bool]:
    """(GiB, label, rank 0 only) of the model on the host while loading. every_rank: under FSDP every rank loads
    the checkpoint, rather than rank 0 alone with the others on meta."""
    wb, P = su.wb, su.s.n_params
    if random and su.fsdp and not su.bits:
        load, label = P * wb / GIB, f"loading: random weights built on the host ({su.label})"
    elif random:
        load, label = 0.0, "loading: none (random weights are built on the GPU)"
    elif su.bits and not su.fsdp:
        load, label = 0.0, "loading: none (quantized while streaming to the GPU)"
    else:
        load = P * (2 if su.bits else wb) / GIB
        label = f"loading: the whole model on the host ({'compute dtype' if su.bits else su.label})"
    rank0_only = su.fsdp and not every_rank and load > 0
    if rank0_only:
        label += ", rank 0 only (the others start on meta)"
    return load, label, rank0_only
