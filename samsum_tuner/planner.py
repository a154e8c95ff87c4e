"""Memory preflight: peak GPU memory per rank and host memory per node, from config.json and the recipe alone.

Every term is physics you can check by hand: parameter counts from the shape, bytes per parameter from the
precision, and activation bytes from the tensors that autograd saves in a transformers Llama layer. The
activation formula below was checked tensor by tensor with `torch.autograd.graph.saved_tensors_hooks` on an
H100 (Llama-2-7B dims, sdpa, transformers 5.17, torch 2.11): it matches the saved bytes exactly for full,
LoRA, fp32, autocast and pure-bf16 layers (to 8 bytes per token per layer), and it predicts the measured peak
allocated of a 32-layer LoRA run (bf16 weights + bf16 autocast, batch 8, vocab 32,000) within 0.5 %: 58.82 GiB
measured at 8 x 1150 tokens (59.06 predicted), 41.72 at 8 x 725 (41.90). DESIGN.md's anchor (46.5 GiB, same
setup with SmolLM2's 49,152-token vocabulary) corresponds under this formula to a worst batch whose longest
sample had about 800 tokens: that run's longest batch, not SAMSum's longest sample (1150).
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any

from .config import Recipe, validate
from .errors import ConfigError
from .shapes import ModelShape, shape_for_model_name, shape_from_config, target_names

GIB = 2**30

# ---------------------------------------------------------------- constants (the only tunables)
# CUDA context (~0.3-0.5 GiB with lazy module loading) plus cuBLAS/cuDNN workspaces (~0.2 GiB measured on
# an H100 on top of the context): memory the card loses before the caching allocator sees a byte.
CUDA_CONTEXT_GIB = 0.75
# NCCL communicators and their buffers, per rank, when more than one GPU takes part.
NCCL_GIB = 0.5
# The caching allocator reserves more than it hands out (block rounding, split blocks that cannot be reused):
# a few percent at steady state; beyond that PyTorch frees its cache and retries (the 2023 log's "malloc retries").
FRAGMENTATION = 0.05
# Per process on the host: the interpreter, torch + CUDA runtime libraries, tokenizer and tokenized SAMSum.
HOST_BASELINE_GIB = 2.5
# Under FSDP, rank 0 loads the checkpoint and the other ranks start on meta (cpu_ram_efficient_loading in
# accelerate_configs/ and launch.py, as fsdp_qlora does); set True if that is switched off.
FSDP_LOADS_ON_EVERY_RANK = False
# CUDA's fused dropout saves a bool mask (1 byte per element); CPU's saves a noise tensor of the input dtype.
DROPOUT_MASK_BYTES = 1
# Loss: transformers upcasts logits to fp32; cross_entropy saves the fp32 log-probabilities (4 bytes per vocab
# entry per token) and backward adds the nll gradient and the log-softmax gradient (4 + 4) before freeing them.
LOGITS_BYTES_PER_VOCAB = 12
# NF4 with double quantization: 4 bits per weight, an 8-bit absmax per 64-weight block, and an fp32 scale per
# 256 absmax values. int8 (LLM.int8) is 1 byte per weight plus an fp32 scale per output row (added per layer).
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
INT8_BYTES = 1.0
# Training on the CPU (no CUDA): everything lives in host memory, and PyTorch's CPU kernels keep about twice
# what the CUDA path above saves per token (dropout noise tensors instead of bool masks, the CPU attention and
# cross-entropy kernels). Measured on SmolLM2-135M LoRA (demo_cpu.yaml, fp32, packed rows of 1,024 and 2,048
# tokens): RSS growth over forward + backward up to 4.57 and 8.82 GiB against 2.13 and 4.26 GiB modelled here
# (the same step's RSS peak varies by up to 30% from run to run with the allocator; this takes the high end).
CPU_ACTIVATION_FACTOR = 2.1
# The process on the CPU before training: interpreter, torch, tokenizer, data (measured 1.2 GiB for the demo).
HOST_BASELINE_CPU_GIB = 1.2
# FSDP2 over several ranks: the layer being computed plus the one prefetched are unsharded at once. With one
# rank there is no all-gather (torch >= 2.9, pytorch#160135): a layer is copied into its unsharded buffer only
# when it runs, so nothing is prefetched (see _estimate).
FSDP_LAYERS_IN_FLIGHT = 2
# SAMSum train split with the original prompt ("Summarize this dialog: ... Summary:"), Llama-2 tokenizer,
# prompt + summary + EOS: mean 201 tokens, 99th percentile 599, longest ~1150. Used when the caller does not
# pass the real per-sample lengths (api.py passes them once the data is tokenized).
DEFAULT_TOKEN_STATS = {"mean": 201, "p99": 599, "max": 1150}


# ---------------------------------------------------------------- the plan
@dataclass
class Plan:
    rows: list[tuple[str, float, float]]  # (component, GPU GiB per rank, host GiB per rank)
    gpu_peak_gib: float
    host_peak_gib: float  # whole node: all ranks together
    gpu_capacity_gib: float | None
    host_capacity_gib: float | None
    fits: bool | None
    verdict: str
    suggestion: str | None = None
    notes: list[str] = field(default_factory=list)
    gpus: int = 1
    gpu_fits: bool | None = None
    host_fits: bool | None = None
    # What torch.cuda.max_memory_allocated would read at the peak: gpu_peak_gib less the allocator's fragmentation
    # and the CUDA context (neither of which the caching allocator counts), and less any loading peak.
    gpu_allocated_gib: float = 0.0

    def table(self) -> str:
        width = max(len(r[0]) for r in self.rows + [("component", 0, 0)])
        lines = [f"{'component':<{width}}  {'GPU GiB/rank':>12}  {'host GiB/rank':>13}"]
        lines += [f"{name:<{width}}  {gpu:>12.2f}  {host:>13.2f}" for name, gpu, host in self.rows]
        cap = lambda c: f" of {c:.2f}" if c is not None else ""  # noqa: E731
        if any(gpu for _, gpu, _ in self.rows):
            lines.append(f"{'GPU peak per rank':<{width}}  {self.gpu_peak_gib:>12.2f}{cap(self.gpu_capacity_gib)}")
        lines.append(f"{f'host peak, {self.gpus} rank(s) together':<{width}}  {'':>12}  "
                     f"{self.host_peak_gib:>13.2f}{cap(self.host_capacity_gib)}")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _weights_bytes(recipe: Recipe) -> int:
    """Bytes per element of unquantized weights as stored (None = fp32, as the original loaded them)."""
    return 2 if recipe.model.dtype in ("bfloat16", "float16") else 4


def layer_activation_bytes(shape: ModelShape, *, full: bool, compute: int, stream: int, autocast: bool,
                           quant_bits: int | None = None, lora_targets=(), lora_r: int = 8, lora_dropout: float = 0.05,
                           mask_bytes: int = DROPOUT_MASK_BYTES) -> float:
    """Bytes autograd saves per token in one decoder layer (transformers' LlamaDecoderLayer, sdpa).

    compute: bytes of matmul outputs (2 under autocast or half weights); stream: bytes of the residual stream
    and norm outputs (4 when weights are fp32, the norms' included). Checked tensor by tensor (module doc).
    """
    h, i, kv = shape.hidden_size, shape.intermediate_size, shape.kv_dim
    q = shape.q_dim
    c = compute
    # RMSNorm upcasts to fp32 and saves that copy (4h) for its backward, per norm; a trainable scale also
    # saves the normalized input in the stream dtype.
    total = 2 * (4 * h + (stream * h if full else 0))
    # sdpa (flash / memory-efficient) saves q, k, v after RoPE, its output and a per-head logsumexp.
    total += c * (q + 2 * kv) + c * q + 4 * shape.num_attention_heads
    # bitsandbytes 4-bit layers return their input's dtype (fp32: prepare_model_for_kbit_training upcasts the
    # norms), so the MLP's saved tensors are fp32; 8-bit layers return the autocast dtype (measured on CPU).
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


def _worst_batch_tokens(recipe: Recipe, token_lengths: list[int] | None) -> tuple[int, str]:
    b, cap = recipe.train.per_device_train_batch_size, recipe.data.max_length
    budget = recipe.data.max_tokens_per_batch
    if budget:
        how = "packed" if recipe.data.packing else "padded, rows x the longest"
        return budget, f"data.max_tokens_per_batch: at most {budget:,} tokens ({how}) whatever the samples"
    if token_lengths:
        top = sorted((min(n, cap) for n in token_lengths), reverse=True)[:b]
        src = f"{len(token_lengths):,} real samples, longest {top[0]}"
        if recipe.data.packing:
            return sum(top), f"packed: the {len(top)} longest samples together ({src})"
        return b * top[0], f"padded: {b} x the longest sample ({src})"
    longest, p99 = min(DEFAULT_TOKEN_STATS["max"], cap), min(DEFAULT_TOKEN_STATS["p99"], cap)
    src = "default SAMSum lengths: original prompt, Llama-2 tokenizer, mean 201, p99 599, max 1150"
    if recipe.data.packing:
        return longest + (b - 1) * p99, f"packed: the longest sample + {b - 1} at the 99th percentile ({src})"
    return b * longest, f"padded: {b} x the longest sample ({src})"


def _logit_positions(recipe: Recipe, lengths: list[int] | None, supervised: list[int] | None, tokens: int) -> int:
    """Positions whose logits the worst batch computes: all `tokens`, or with train.supervised_logits_only those
    predicting a label (packed: the batch's summary tokens; padded: the union of the rows' summary spans)."""
    if not recipe.train.supervised_logits_only or not lengths or not supervised:
        return tokens
    from .data import token_budget_batches

    d = recipe.data
    n = [min(x, d.max_length) for x in lengths]
    if d.max_tokens_per_batch:
        batches = token_budget_batches(n, d.max_tokens_per_batch, d.packing, recipe.train.seed)
    else:  # the batch _worst_batch_tokens plans for: the longest samples together
        batches = [sorted(range(len(n)), key=lambda i: -n[i])[:recipe.train.per_device_train_batch_size]]

    def positions(batch: list[int]) -> int:
        if d.packing:
            return sum(supervised[i] for i in batch)
        return max(n[i] for i in batch) - min(n[i] - supervised[i] for i in batch)

    return min(tokens, max(positions(b) for b in batches))


def _optimizer(recipe: Recipe, trainable: int, state_bytes: int) -> tuple[float, float, str]:
    """(optimizer state bytes, step workspace bytes, name) for the trainable parameters."""
    t = recipe.train
    name = t.optim.lower()
    if name == "sgd":
        return (trainable * state_bytes if t.momentum > 0 else 0), 0, "SGD momentum" if t.momentum > 0 else "SGD"
    if "8bit" in name:
        return trainable * 2, 0, "8-bit AdamW states"  # two uint8 states; bitsandbytes steps tensor by tensor
    # torch AdamW (foreach, the CUDA default): exp_avg + exp_avg_sq, and the step builds sqrt(exp_avg_sq) for
    # every parameter at once: one more full-size temporary (measured: 12 B/param at the first step, 4 after).
    workspace = 0 if "fused" in name else trainable * state_bytes
    return 2 * trainable * state_bytes, workspace, "AdamW states"


@dataclass
class _Estimate:
    gpu_rows: list[tuple[str, float]]
    host_rows: list[tuple[str, float]]
    gpu_peak: float
    host_peak: float
    ranks: int
    notes: list[str]
    allocated: float = 0.0  # bytes: the accelerator's peak before fragmentation and context
    per_token: float = 0.0  # bytes: activations + logits (what grows with the batch)


def plan(recipe: Recipe, *, gpus: int = 1, gpu_memory_gib: float | None = None,
         host_memory_gib: float | None = None, token_lengths: list[int] | None = None,
         shape: ModelShape | None = None, device: str = "cuda", supervised_lengths: list[int] | None = None) -> Plan:
    """Predict peak GPU memory per rank and host memory per node; verdict and nearest fitting change.

    device="cpu": a run without CUDA, where all of it is host memory. `supervised_lengths` (per sample, aligned
    with `token_lengths`: the tokens with a label) size the logits when train.supervised_logits_only is on."""
    shape = shape or _shape_or_config(recipe.model.name)
    e = _estimate(recipe, gpus, token_lengths, shape, supervised_lengths)
    if device == "cpu":
        e, gpu_memory_gib = _on_the_cpu(e), None
    gpu_fits = None if gpu_memory_gib is None else e.gpu_peak <= gpu_memory_gib
    host_fits = None if host_memory_gib is None else e.host_peak <= host_memory_gib
    known = [v for v in (gpu_fits, host_fits) if v is not None]
    fits = all(known) if known else None
    suggestion = None
    if fits is False:
        suggestion = _nearest_fit(recipe, gpus, gpu_memory_gib, host_memory_gib, token_lengths, shape, device,
                                  supervised_lengths)
    verdict = _verdict(e, gpu_fits, host_fits, gpu_memory_gib, host_memory_gib, suggestion)
    rows = [(name, g, 0.0) for name, g in e.gpu_rows] + [(name, 0.0, x) for name, x in e.host_rows]
    return Plan(rows, e.gpu_peak, e.host_peak, gpu_memory_gib, host_memory_gib, fits, verdict, suggestion,
                e.notes, gpus, gpu_fits, host_fits, e.allocated / GIB if e.gpu_rows else 0.0)


def _on_the_cpu(e: _Estimate) -> _Estimate:
    cpu = (e.allocated + (CPU_ACTIVATION_FACTOR - 1) * e.per_token) / GIB
    label = f"training on the CPU: the GPU column's tensors, activations + logits x {CPU_ACTIVATION_FACTOR:g}"
    rows = [(label, cpu), ("Python, torch, tokenizer, data (CPU process)", HOST_BASELINE_CPU_GIB)]
    notes = [n for n in e.notes if not n.startswith("host modelled")]
    notes.append(f"no CUDA: everything is host memory; CPU kernels save ~{CPU_ACTIVATION_FACTOR:g}x the CUDA path's "
                 "activations (measured on SmolLM2, see planner.py)")
    # Every CPU rank (torchrun DDP over gloo) holds all of it: the node holds them all.
    return _Estimate([], rows, 0.0, e.ranks * (HOST_BASELINE_CPU_GIB + cpu), e.ranks, notes)


def pinned_shard_bytes(s: ModelShape, n: int, elem: int) -> int:
    """Every parameter's 1/n shard (dim 0, as FSDP2 splits it) in pinned host memory. CUDA's caching host
    allocator rounds each block up to a power of two: Llama-2-7B's fp32 MLP shards of 172 MiB take 256 MiB, and its
    25.6 GiB of fp32 weights 34 GiB (measured on an H200: 1-process offload with SGD, host peak 95.7 GiB against
    96.1 from this, 79.4 from raw sizes)."""
    def pinned(rows: int, cols: int) -> int:
        return 1 << (-(-rows // n) * cols * elem - 1).bit_length()

    layer = sum(pinned(out, inp) for inp, out in s.linear_dims().values()) + 2 * pinned(s.hidden_size, 1)
    tail = pinned(s.vocab_size, s.hidden_size) * (1 if s.tie_word_embeddings else 2) + pinned(s.hidden_size, 1)
    return s.num_hidden_layers * layer + tail


def _estimate(recipe: Recipe, gpus: int, token_lengths: list[int] | None, s: ModelShape,
              supervised_lengths: list[int] | None = None) -> _Estimate:
    m, q, lo, t, f = recipe.model, recipe.quantization, recipe.lora, recipe.train, recipe.fsdp
    L, V, h = s.num_hidden_layers, s.vocab_size, s.hidden_size
    P, lin = s.n_params, s.linear_params()
    notes: list[str] = []
    fsdp, offload = f.enabled, f.enabled and f.cpu_offload
    n = gpus if fsdp and f.sharding_strategy != "NO_SHARD" else 1  # shards of params, grads, optimizer states
    half_train = t.fp16 or t.bf16
    mp = fsdp and half_train  # FSDP mixed precision: fp32 sharded master, half all-gathered params
    wb = _weights_bytes(recipe)
    c = 2 if half_train or wb == 2 else 4  # bytes of matmul outputs
    stream = 2 if mp or (not q.bits and wb == 2) else 4  # residual stream and norm outputs

    # -- weights, as stored before sharding
    if q.bits:
        per_linear = NF4_BYTES if q.bits == 4 else INT8_BYTES
        scales = 0 if q.bits == 4 else 4 * L * sum(o for _, o in s.linear_dims().values())
        # prepare_model_for_kbit_training upcasts everything not quantized (embeddings, norms, lm_head) to fp32.
        weights = lin * per_linear + scales + (P - lin) * 4
        layer_bytes = (lin * per_linear + scales) / L + 2 * h * 4
    else:
        weights = P * wb
        layer_bytes = s.layer_params * (c if mp else wb)
    full = not lo.enabled
    lora_n = s.lora_params(lo.target_modules, lo.r) if lo.enabled else 0
    trainable = P if full else lora_n
    state_b = wb if full and not q.bits else 4  # pure half params keep half grads and states; adapters are fp32
    grads = trainable * state_b
    opt_states, step_ws, opt_name = _optimizer(recipe, trainable, state_b)

    # -- GPU: (component, bytes, still allocated at the optimizer step)
    gpu: list[tuple[str, float, bool]] = []
    shard = f", 1/{n} shard" if n > 1 else ""
    label = {4: "4-bit NF4 base", 8: "int8 base"}.get(q.bits or 0, "fp32" if wb == 4 else m.dtype)
    if not offload:
        gpu.append((f"weights ({label}{shard})", weights / n, True))
        if lora_n:
            gpu.append(("LoRA adapters (fp32)", lora_n * 4 / n, True))
    tokens, how = _worst_batch_tokens(recipe, token_lengths)
    # The vocabulary-wide tensors exist at every position, or with train.supervised_logits_only only where a
    # summary token is predicted; the final norm and lm_head input exist at every position either way.
    logits = (_logit_positions(recipe, token_lengths, supervised_lengths, tokens) * LOGITS_BYTES_PER_VOCAB * V
              + tokens * 8 * h)
    if fsdp:
        # What FSDP2 holds unsharded at the peak (the loss, every layer's activations alive). accelerate's
        # fsdp2_prepare_model (accelerate#4015, in 1.15) gives the input embedding a unit of its own, resharded
        # after its forward like each decoder layer (and not gathered again before the end of backward); only
        # lm_head (with the tied embedding, if tied) keeps reshard_after_forward=False, and the final norm sits
        # with it or in the root, which never reshards: both stay unsharded from the end of forward into backward.
        tail = (V * h + h) * (c if mp else 4 if q.bits else wb)
        if f.sharding_strategy == "SHARD_GRAD_OP":  # no reshard after forward: every layer waits for backward
            layers, unsharded = L, L * layer_bytes + tail
        elif gpus > 1:
            layers, unsharded = FSDP_LAYERS_IN_FLIGHT, FSDP_LAYERS_IN_FLIGHT * layer_bytes + tail
        else:
            # One rank: no all-gather and no prefetch; a layer is unsharded only while it runs. The first layer
            # of backward is unsharded after the tail is resharded and the logits freed, so the peak is the
            # larger of tail + logits and one layer. (Checked on an H200, torch 2.11, accelerate 1.15: at the loss
            # only final norm + lm_head are unsharded, inside the last layer's backward only that layer.)
            layers, unsharded = 0, max(tail, layer_bytes - logits)
        if layers:
            held = f"{layers} layer(s) + final norm/lm_head"
        else:
            held = f"{'final norm/lm_head' if unsharded == tail else 'one layer'} (1 rank, no prefetch)"
        gpu.append((f"FSDP unsharded ({'half' if mp else 'as stored'}): {held}", unsharded, False))
    if half_train and not mp and wb == 4 and not q.bits:
        # Autocast casts each fp32 weight to half per use, and autograd keeps the copies until backward.
        gpu.append(("autocast half copies of fp32 weights", (lin + V * h + lora_n) * 2, False))
    if full:
        # One gradient beyond the accumulated ones: FSDP's unsharded layer before reduce-scatter, or the fresh
        # gradient of the largest tensor (lm_head) before it is added to .grad.
        in_flight = s.layer_params * (c if mp else state_b) if fsdp else V * h * state_b
        gpu.append(("gradient in flight (one layer or lm_head)", in_flight, False))
    if not offload:
        gpu.append((f"gradients ({'fp32' if state_b == 4 else 'half'}{shard})", grads / n, True))
        if opt_states:
            gpu.append((f"optimizer: {opt_name}{shard}", opt_states / n, True))
        if gpus > 1 and not fsdp:
            gpu.append(("DDP gradient buckets", grads, True))
    if fsdp and t.gradient_accumulation_steps > 1 and not f.reduce_every_micro_batch:
        # The Trainer's no_sync on all but the last micro-batch: FSDP2 keeps every layer's gradient unsharded, in
        # the reduce dtype, until then (checked with fully_shard on 2 gloo ranks), while the shards do not exist
        # yet: the whole unsharded set where the shards were counted.
        extra = trainable * (c if mp else state_b) - (0 if offload else grads / n)
        if extra > 0:
            gpu.append(("gradients held unsharded between micro-batches (fsdp.reduce_every_micro_batch=false), "
                        "beyond the shards", extra, False))

    per_layer = layer_activation_bytes(s, full=full, compute=c, stream=stream, autocast=half_train, quant_bits=q.bits,
                                       lora_targets=lo.target_modules if lo.enabled else (), lora_r=lo.r,
                                       lora_dropout=lo.dropout)
    checkpointed = recipe.checkpoints_activations  # as training decides it (config.py): under FSDP unless turned off
    # Backward recomputes one layer at a time, after the loss is freed, beside the gradient flowing through its MLP
    # (one intermediate-wide tensor; checked on CPU with torch's MemTracker, tests/test_planner.py).
    recomputed = (per_layer + c * s.intermediate_size) * tokens
    if checkpointed:
        # Each layer keeps only its input (the residual stream); the layer's own tensors exist only while it runs.
        acts = L * stream * h * tokens + max(0, recomputed - logits)
        gpu.append((f"activations, checkpointed ({L} layer inputs + 1 layer recomputed in backward; {tokens:,} tokens)",
                    acts, False))
    else:
        acts = L * per_layer * tokens
        act_label = f"activations ({L} layers x {tokens:,} tokens, {per_layer / 1024:.0f} KiB/token/layer)"
        gpu.append((act_label, acts, False))
    gpu.append((f"logits + loss (fp32, vocab {V:,})", logits, False))
    fwd_bwd = sum(b for _, b, _ in gpu)
    if t.gradient_accumulation_steps == 1 and not offload and grads:
        # The Trainer sets every .grad to None after the optimizer step, so with one micro-batch per step the
        # gradients appear only in backward, as the activations they come from are freed: the peak holds the
        # larger of the two, not their sum (+ one recomputed layer beside the gradients when checkpointing).
        # Measured on 2 H200s (fsdp2_full_sgd_fast): 7B SGD fp32, the first step's 4,055 packed tokens, before
        # any momentum exists, peaked at 57.38 GiB allocated; the sum, less the momentum, would be 69.95.
        beside = recomputed if checkpointed else 0
        fwd_bwd += max(grads / n + beside, acts + logits) - grads / n - (acts + logits)
        notes.append("one micro-batch per step: gradients and activations counted as the larger of the two, "
                     "not both (they do not coexist)")
    step = sum(b for _, b, kept in gpu if kept) + (0 if offload else step_ws / n)
    if step_ws and not offload:
        gpu.append(("AdamW step workspace (at the step, activations freed)", step_ws / n, False))
    if step > fwd_bwd:
        notes.append("the GPU peak is at the optimizer step (AdamW's workspace), not in forward/backward")
    allocated = max(fwd_bwd, step) / GIB
    overhead = CUDA_CONTEXT_GIB + (NCCL_GIB if gpus > 1 else 0)
    gpu_rows = [(name, b / GIB) for name, b, _ in gpu]
    gpu_rows.append((f"allocator fragmentation ({FRAGMENTATION:.0%} of allocated)", FRAGMENTATION * allocated))
    gpu_rows.append(("CUDA context, cuBLAS" + (", NCCL" if gpus > 1 else ""), overhead))
    gpu_peak = allocated * (1 + FRAGMENTATION) + overhead
    random = m.name.startswith("random:")
    if fsdp and random and q.bits:
        # model.py builds a 4-bit random shape whole on each rank's GPU (bitsandbytes quantizes there);
        # FSDP shards it afterwards.
        built = (weights + lora_n * 4) / GIB
        gpu_rows.append(("loading: random 4-bit model built whole on each GPU (before sharding)", built))
        if built + overhead > gpu_peak:
            gpu_peak = built + overhead
            notes.append("the GPU peak is while loading: the random model is built whole before FSDP shards it")

    # -- host, per rank: baseline + max(loading transient, offloaded state); the node holds all ranks
    host_rows: list[tuple[str, float]] = []
    offloaded = 0.0
    if offload:
        # FSDP2 pins the offloaded parameter shards and the gradients it copies out: pinned sizes, not raw ones.
        pinned_w = weights / n if q.bits else pinned_shard_bytes(s, n, wb)
        pinned_g = pinned_shard_bytes(s, n, state_b) if full else grads / n
        offloaded = (pinned_w + lora_n * 4 / n + pinned_g + opt_states / n) / GIB
        host_rows.append((f"CPU offload: {label} params and grads (pinned), {opt_name}{shard}", offloaded))
    if random and fsdp and not q.bits:
        load, load_label = P * wb / GIB, f"loading: random weights built on the host ({label})"
    elif random:
        load, load_label = 0.0, "loading: none (random weights are built on the GPU)"
    elif q.bits and not fsdp:
        load, load_label = 0.0, "loading: none (quantized while streaming to the GPU)"
    else:
        load = P * (2 if q.bits else wb) / GIB
        load_label = f"loading: the whole model on the host ({'compute dtype' if q.bits else label})"
    rank0_only = fsdp and not FSDP_LOADS_ON_EVERY_RANK and load > 0
    if rank0_only:
        load_label += ", rank 0 only (the others start on meta)"
    host_rows += [(load_label, load), ("Python, torch, CUDA runtime, data", HOST_BASELINE_GIB)]
    rank0 = HOST_BASELINE_GIB + max(load, offloaded)
    others = HOST_BASELINE_GIB + (offloaded if rank0_only else max(load, offloaded))
    host_peak = rank0 + others * (gpus - 1)

    notes.append(f"worst batch: {tokens:,} tokens, {how}; evaluation (no saved activations) is not modelled")
    notes.append(f"host modelled per rank: {HOST_BASELINE_GIB} GiB baseline + max(loading {load:.2f}"
                 f"{' on rank 0' if rank0_only else ''}, offloaded {offloaded:.2f}) GiB, {gpus} rank(s); "
                 "not modelled: the checkpoint's page cache, CPU optimizer temporaries, allocator caching")
    if offload:
        notes.append("host under CPU offload: a 1-process 7B SGD fp32 run reached 95.7 GiB on an H200 where this "
                     "model gives 96.1; in the 2023 log (Llama-2-7B, AdamW fp32, 4 ranks) rank 0 reached 40 GB "
                     "(37.3 GiB) where it gives 31.6 GiB per rank")
    if fsdp and FSDP_LOADS_ON_EVERY_RANK and load:
        notes.append("FSDP: every rank loads the whole model on the host first "
                     "(launch.py: cpu_ram_efficient_loading off)")
    if q.bits and fsdp:
        notes.append("FSDP + quantization: the host copy while loading is assumed to be in the compute dtype")
    return _Estimate(gpu_rows, host_rows, gpu_peak, host_peak, gpus, notes, max(fwd_bwd, step), acts + logits)


def _shape_or_config(name: str) -> ModelShape:
    shape = shape_for_model_name(name)
    if shape is not None:
        return shape
    try:  # a hub id: config.json only (cached after the first time), never the weights
        from transformers import AutoConfig

        return shape_from_config(AutoConfig.from_pretrained(name))
    except Exception as e:  # offline, gated, misspelt
        raise ConfigError(f"model.name: the memory planner needs {name}'s config.json ({type(e).__name__}); "
                          "point model.name at a local folder or set memory.preflight=false") from None


def _verdict(e: _Estimate, gpu_fits, host_fits, gpu_cap, host_cap, suggestion) -> str:
    gpu = (f"GPU {e.gpu_peak:.2f} GiB per rank" + (f" of {gpu_cap:.2f}" if gpu_cap is not None else "")
           if e.gpu_rows else "no GPU (a CPU run)")
    host = f"host {e.host_peak:.2f} GiB for {e.ranks} rank(s)" + (f" of {host_cap:.2f}" if host_cap is not None else "")
    if gpu_fits is None and host_fits is None:
        return f"no verdict (capacity unknown): {gpu}, {host}"
    if gpu_fits is not False and host_fits is not False:
        return f"fits: {gpu}, {host}"
    short = []
    if gpu_fits is False:
        short.append(f"GPU needs {e.gpu_peak:.2f} GiB of {gpu_cap:.2f}")
    if host_fits is False:
        short.append(f"host needs {e.host_peak:.2f} GiB of {host_cap:.2f} for {e.ranks} rank(s)")
    tail = f"nearest that fits: {suggestion}" if suggestion else "no single change or pair of changes tried fits"
    return f"will not fit: {'; '.join(short)}; {tail}"


# ---------------------------------------------------------------- nearest configuration that fits
def _candidates(recipe: Recipe, device: str = "cuda") -> list[tuple[str, Any]]:
    """(label, change) in a fixed order, mildest first. A change edits a copy of the recipe in place and
    returns the GPU count to plan for, or None where it does not apply (nothing to change). On the CPU,
    offload and more GPUs do not apply."""

    def batch1(r, g):
        b = r.train.per_device_train_batch_size
        if b == 1:
            return None
        r.train.per_device_train_batch_size = 1
        r.train.gradient_accumulation_steps *= b
        return g  # same samples per optimizer step

    def flag(obj: str, attr: str, value=True, unless=None):
        def change(r, g):
            section = getattr(r, obj)
            if getattr(section, attr) == value or (unless and unless(r)):
                return None
            setattr(section, attr, value)
            return g
        return change

    def half_base(r, g):  # LoRA only: the frozen base loses nothing that training could use
        if not r.lora.enabled or r.quantization.bits or r.model.dtype not in (None, "float32"):
            return None
        r.model.dtype = "float16" if r.train.fp16 else "bfloat16"
        return g

    def qlora(r, g):
        if r.quantization.bits == 4:
            return None
        r.lora.enabled, r.quantization.bits = True, 4
        return g

    def offload(r, g):
        if r.fsdp.cpu_offload or device == "cpu":
            return None
        r.fsdp.enabled = r.fsdp.cpu_offload = True
        return g

    def more_gpus(k):
        def change(r, g):
            if k < g or (k == g and r.fsdp.enabled) or device == "cpu":
                return None
            r.fsdp.enabled = True
            return k
        return change

    not_adam = lambda r: not r.train.optim.lower().startswith("adam")  # noqa: E731
    return [
        ("batch 1", batch1),
        ("gradient checkpointing", flag("model", "gradient_checkpointing", unless=lambda r: r.checkpoints_activations)),
        ("LoRA instead of full fine-tuning", flag("lora", "enabled")),
        ("fp16 base weights (model.dtype=float16)" if recipe.train.fp16 else "bf16 base weights (model.dtype=bfloat16)",
         half_base),
        ("4-bit QLoRA", qlora),
        ("enable CPU offload", offload),
        ("4 GPUs with FSDP", more_gpus(4)),
        ("8 GPUs with FSDP", more_gpus(8)),
        ("SGD instead of AdamW", flag("train", "optim", "sgd", unless=not_adam)),
    ]


def _nearest_fit(recipe, gpus, gpu_gib, host_gib, token_lengths, shape, device="cuda",
                 supervised_lengths=None) -> str | None:
    """First single change, then first pair of changes, in `_candidates` order, whose plan fits."""
    cands = _candidates(recipe, device)
    for combo in itertools.chain(((c,) for c in cands), itertools.combinations(cands, 2)):
        r, g = copy.deepcopy(recipe), gpus
        for _, change in combo:
            g = change(r, g) if g is not None else None
        if g is None:
            continue
        try:
            validate(r)
        except ConfigError:
            continue
        e = _estimate(r, g, token_lengths, shape, supervised_lengths)
        if device == "cpu":
            e = _on_the_cpu(e)
        if (gpu_gib is None or e.gpu_peak <= gpu_gib) and (host_gib is None or e.host_peak <= host_gib):
            return " + ".join(label for label, _ in combo)
    return None
