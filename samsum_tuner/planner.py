"""Memory preflight: peak GPU memory per rank and host memory per node, from config.json and the recipe alone.

The terms are in planner_terms.py; this adds them up, gives the verdict and searches the nearest change that fits.
How each term is estimated, and the measurements that check it: docs/planner.md.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any

from .checks import validate
from .config import Recipe
from .errors import ConfigError
from .planner_terms import (FRAGMENTATION, GIB, HOST_BASELINE_GIB, activation_row, autocast_copy_rows,
                            cuda_overhead_gib, fsdp_unsharded_rows, gradient_and_optimizer_rows, gradient_bytes,
                            gradient_in_flight_rows, host_loading, logits_bytes, offloaded_host_gib, optimizer_bytes,
                            random_4bit_build_gib, setup, single_micro_batch_overlap, stored_weights,
                            unsharded_gradient_rows, weight_rows)
from .shapes import ModelShape, shape_for_model_name, shape_from_config

# Under FSDP, rank 0 loads the checkpoint and the other ranks start on meta (cpu_ram_efficient_loading in
# accelerate_configs/ and launch.py, as fsdp_qlora does); set True if that is switched off.
FSDP_LOADS_ON_EVERY_RANK = False
# Training on the CPU (no CUDA): PyTorch's CPU kernels keep about twice what the CUDA path saves per token
# (dropout noise tensors instead of bool masks, CPU attention and cross-entropy); measured on SmolLM2, figures
# in docs/planner.md.
CPU_ACTIVATION_FACTOR = 2.1
# The process on the CPU before training: interpreter, torch, tokenizer, data (measured on the demo).
HOST_BASELINE_CPU_GIB = 1.2
# SAMSum train split, original prompt, Llama-2 tokenizer (prompt + summary + EOS), used when the caller does not
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
    e = _estimate(recipe, gpus, token_lengths, shape, supervised_lengths, device)
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
    """The estimate for a run without CUDA: the GPU column's tensors move to host memory, activations grow."""
    cpu = (e.allocated + (CPU_ACTIVATION_FACTOR - 1) * e.per_token) / GIB
    label = f"training on the CPU: the GPU column's tensors, activations + logits x {CPU_ACTIVATION_FACTOR:g}"
    rows = [(label, cpu), ("Python, torch, tokenizer, data (CPU process)", HOST_BASELINE_CPU_GIB)]
    notes = [n for n in e.notes if not n.startswith("host modelled")]
    notes.append(f"no CUDA: everything is host memory; CPU kernels save ~{CPU_ACTIVATION_FACTOR:g}x the CUDA path's "
                 "activations (measured on SmolLM2, see planner.py)")
    # Every CPU rank (torchrun DDP over gloo) holds all of it: the node holds them all.
    return _Estimate([], rows, 0.0, e.ranks * (HOST_BASELINE_CPU_GIB + cpu), e.ranks, notes)


def _worst_batch_tokens(recipe: Recipe, token_lengths: list[int] | None) -> tuple[int, str]:
    """(tokens in the worst batch, how they were found): the token budget, the real lengths or SAMSum's defaults,
    each row rounded up to data.pad_to_multiple_of as the collator pads it."""
    b, cap, m = recipe.train.per_device_train_batch_size, recipe.data.max_length, recipe.data.pad_to_multiple_of or 1
    budget = recipe.data.max_tokens_per_batch

    def row(n: int) -> int:
        return -(-n // m) * m

    if budget:
        how = "packed" if recipe.data.packing else "padded, rows x the longest"
        return budget, f"data.max_tokens_per_batch: at most {budget:,} tokens ({how}) whatever the samples"
    if token_lengths:
        top = sorted((min(n, cap) for n in token_lengths), reverse=True)[:b]
        src = f"{len(token_lengths):,} real samples, longest {top[0]}"
        if recipe.data.packing:
            return row(sum(top)), f"packed: the {len(top)} longest samples together ({src})"
        return b * row(top[0]), f"padded: {b} x the longest sample ({src})"
    longest, p99 = min(DEFAULT_TOKEN_STATS["max"], cap), min(DEFAULT_TOKEN_STATS["p99"], cap)
    src = "default SAMSum lengths: original prompt, Llama-2 tokenizer, mean 201, p99 599, max 1150"
    if recipe.data.packing:
        return row(longest + (b - 1) * p99), f"packed: the longest sample + {b - 1} at the 99th percentile ({src})"
    return b * row(longest), f"padded: {b} x the longest sample ({src})"


def _logit_positions(recipe: Recipe, lengths: list[int] | None, supervised: list[int] | None, tokens: int) -> int:
    """Positions whose logits the worst batch computes: all `tokens`, or with train.supervised_logits_only those
    predicting a label (packed: the batch's summary tokens; padded: the union of the rows' summary spans)."""
    if not recipe.train.supervised_logits_only or not lengths or not supervised:
        return tokens
    from .batching import token_budget_batches

    d = recipe.data
    n = [min(x, d.max_length) for x in lengths]
    if d.max_tokens_per_batch:
        batches = token_budget_batches(n, d.max_tokens_per_batch, d.packing, recipe.train.seed, d.pad_to_multiple_of)
    else:  # the batch _worst_batch_tokens plans for: the longest samples together
        batches = [sorted(range(len(n)), key=lambda i: -n[i])[:recipe.train.per_device_train_batch_size]]

    def positions(batch: list[int]) -> int:
        if d.packing:
            return sum(supervised[i] for i in batch)
        return max(n[i] for i in batch) - min(n[i] - supervised[i] for i in batch)

    return min(tokens, max(positions(b) for b in batches))


def _estimate(recipe: Recipe, gpus: int, token_lengths: list[int] | None, s: ModelShape,
              supervised_lengths: list[int] | None = None, device: str = "cuda") -> _Estimate:
    """Every term, GPU then host, and the peaks they add up to."""
    su = setup(recipe, gpus, s, device)
    notes: list[str] = []
    weights, layer_bytes = stored_weights(su)
    grads = gradient_bytes(su)
    opt_states, step_ws, opt_name = optimizer_bytes(recipe, su.trainable, su.state_b)
    tokens, how = _worst_batch_tokens(recipe, token_lengths)
    logits = logits_bytes(su, _logit_positions(recipe, token_lengths, supervised_lengths, tokens), tokens)

    # -- GPU: (component, bytes, still allocated at the optimizer step)
    gpu = weight_rows(su, weights)
    gpu += fsdp_unsharded_rows(su, layer_bytes, logits)
    gpu += autocast_copy_rows(su)
    gpu += gradient_in_flight_rows(su)
    gpu += gradient_and_optimizer_rows(su, grads, opt_states, opt_name)
    gpu += unsharded_gradient_rows(su, grads)
    activations, recomputed = activation_row(su, tokens, logits)
    acts = activations[1]
    gpu.append(activations)
    gpu.append((f"logits + loss (fp32, vocab {s.vocab_size:,})", logits, False))
    fwd_bwd = sum(b for _, b, _ in gpu)
    if recipe.train.gradient_accumulation_steps == 1 and not su.offload and grads:
        fwd_bwd += single_micro_batch_overlap(su, grads, acts, logits, recomputed)
        notes.append("one micro-batch per step: gradients and activations counted as the larger of the two, "
                     "not both (they do not coexist)")
    step = sum(b for _, b, kept in gpu if kept) + (0 if su.offload else step_ws / su.n)
    if step_ws and not su.offload:
        gpu.append(("AdamW step workspace (at the step, activations freed)", step_ws / su.n, False))
    if step > fwd_bwd:
        notes.append("the GPU peak is at the optimizer step (AdamW's workspace), not in forward/backward")
    allocated = max(fwd_bwd, step) / GIB
    overhead = cuda_overhead_gib(gpus)
    gpu_rows = [(name, b / GIB) for name, b, _ in gpu]
    gpu_rows.append((f"allocator fragmentation ({FRAGMENTATION:.0%} of allocated)", FRAGMENTATION * allocated))
    gpu_rows.append(("CUDA context, cuBLAS" + (", NCCL" if gpus > 1 else ""), overhead))
    gpu_peak = allocated * (1 + FRAGMENTATION) + overhead
    random = recipe.model.name.startswith("random:")
    if su.fsdp and random and su.bits:
        built = random_4bit_build_gib(weights, su.lora_n)
        gpu_rows.append(("loading: random 4-bit model built whole on each GPU (before sharding)", built))
        if built + overhead > gpu_peak:
            gpu_peak = built + overhead
            notes.append("the GPU peak is while loading: the random model is built whole before FSDP shards it")

    # -- host, per rank: baseline + max(loading transient, offloaded state); the node holds all ranks
    host_rows: list[tuple[str, float]] = []
    offloaded = 0.0
    if su.offload:
        offloaded = offloaded_host_gib(su, weights, grads, opt_states)
        host_rows.append((f"CPU offload: {su.label} params and grads (pinned), {opt_name}{su.shard}", offloaded))
    load, load_label, rank0_only = host_loading(su, random, FSDP_LOADS_ON_EVERY_RANK)
    host_rows += [(load_label, load), ("Python, torch, CUDA runtime, data", HOST_BASELINE_GIB)]
    rank0 = HOST_BASELINE_GIB + max(load, offloaded)
    others = HOST_BASELINE_GIB + (offloaded if rank0_only else max(load, offloaded))
    host_peak = rank0 + others * (gpus - 1)

    notes.append(f"worst batch: {tokens:,} tokens, {how}; evaluation (no saved activations) is not modelled")
    notes.append(f"host modelled per rank: {HOST_BASELINE_GIB} GiB baseline + max(loading {load:.2f}"
                 f"{' on rank 0' if rank0_only else ''}, offloaded {offloaded:.2f}) GiB, {gpus} rank(s); "
                 "not modelled: the checkpoint's page cache, CPU optimizer temporaries, allocator caching")
    if su.offload:  # the measured figures behind the offload terms (docs/planner.md)
        notes.append("host under CPU offload: a 1-process 7B SGD fp32 run reached 95.7 GiB on an H200 where this "
                     "model gives 96.1; in the 2023 log (Llama-2-7B, AdamW fp32, 4 ranks) rank 0 reached 40 GB "
                     "(37.3 GiB) where it gives 31.6 GiB per rank")
    if su.fsdp and FSDP_LOADS_ON_EVERY_RANK and load:
        notes.append("FSDP: every rank loads the whole model on the host first "
                     "(launch.py: cpu_ram_efficient_loading off)")
    if su.bits and su.fsdp:
        notes.append("FSDP + quantization: the host copy while loading is assumed to be in the compute dtype")
    return _Estimate(gpu_rows, host_rows, gpu_peak, host_peak, gpus, notes, max(fwd_bwd, step), acts + logits)


def _shape_or_config(name: str) -> ModelShape:
    shape = shape_for_model_name(name)
    if shape is not None:
        return shape
    from .hub import check_hub_id
    from .model_source import looks_local

    if not looks_local(name):  # neither a folder nor a hub id: named as every other command names it
        check_hub_id(name, "model.name")
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
        e = _estimate(r, g, token_lengths, shape, supervised_lengths, device)
        if device == "cpu":
            e = _on_the_cpu(e)
        if (gpu_gib is None or e.gpu_peak <= gpu_gib) and (host_gib is None or e.host_peak <= host_gib):
            return " + ".join(label for label, _ in combo)
    return None
