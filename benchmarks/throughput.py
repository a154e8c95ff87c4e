"""Real (non-pad) tokens/s of samsum_tuner against the baselines of the throughput issue, in one invocation,
on the same GPU(s) and the same SAMSum token stream (the first --rows rows of the train split).

    python benchmarks/throughput.py --suite 7b,qlora,smollm2 --out results_dir [--cap 79.2]
    python benchmarks/throughput.py --suite fsdp --nproc 2 [--model random:llama2-13b] --out results_dir

Each configuration runs in its own process (no compile cache, allocator state or flex-attention singleton
carries over) for --warmup + --steps optimizer steps; the timed window is the last --steps. `--warm CONFIG` runs
CONFIG once first, outside the comparison (a fresh machine's first GPU process is slower). Suites:
  7b       random Llama-2-7B shape, LoRA r=8 on q_proj,v_proj, bf16 weights (4·N FLOPs per token for MFU):
           naive_lora (the baseline below) / flex_lora_b16: the same Trainer + DataCollatorWithFlattening +
           flex_attention, batch 16 (what switching padding-free on gives) / ours_lora: samsum_tuner
           recipes/lora_fast.yaml as committed (model.compile: auto, so each decoder layer is compiled on a GPU) /
           ours_lora_eager: the same with model.compile=false / ours_lora_2k: the recipe at 2,048 tokens per step
           (memory at about the naive run's real tokens per step) / naive_lora_v32k: naive_lora with Llama-2's own
           32,000-token vocabulary (below) / ours_lora_liger: eager with Liger's kernels (train.use_liger_kernel) /
           ours_lora_liger_compiled: both / ours_lora_bf16_adapters: lora.autocast_adapter_dtype=false /
           ours_lora_varlen: torch's variable-length FlashAttention (model.attn_implementation=varlen_attn)
  qlora    the same shape in NF4 (bf16 compute): naive_qlora: the baseline below with the base quantized and
           prepare_model_for_kbit_training(model, use_gradient_checkpointing=False) / naive_qlora_ckpt: the same
           with that call's default, gradient checkpointing on, as the peft and bitsandbytes docs write it /
           ours_qlora: recipes/qlora_fast.yaml as committed (compiled on a GPU) / ours_qlora_eager: uncompiled /
           ours_qlora_2k: the recipe at 2,048 tokens per step (the peak at the naive run's tokens per step) /
           ours_qlora_varlen: with varlen_attn
  smollm2  the embedded SmolLM2-135M, full fine-tune (6·N): TRL SFTTrainer defaults / a plain loop over the
           flattening collator with flex attention and a 16k-token budget / samsum_tuner recipes/smollm2_gpu.yaml
           as committed (compiled on a GPU), uncompiled, at 32,768 and 65,536 tokens per step, with CUDA graphs
           (model.compile_mode=reduce-overhead), eager with Liger's kernels and with varlen_attn
  fsdp     full fine-tune of the random 7B shape (--model random:llama2-13b for 13B; 6·N FLOPs per token) on
           --nproc GPUs, each configuration under `accelerate launch --config_file accelerate_configs/fsdp4.yaml`
           (FSDP2 full shard of each LlamaDecoderLayer), fp32 weights + bf16 mixed precision, lr 1e-5:
           naive_fsdp_adamw / naive_fsdp_sgd: a plain Trainer, padded batches of 4 per GPU, sdpa, the Trainer's
           default AdamW (fused) resp. HF's optim="sgd" (no momentum) / ours_fsdp_adamw / ours_fsdp_sgd:
           samsum_tuner packed rows with flex attention, the token budget per GPU whose batches hold as many real
           tokens as the naive run's 4 rows,
           the same optimizer (SGD without momentum: not recipes/full_sgd.yaml's 0.9) / ours_fsdp_adamw_big: 8,192
           tokens per GPU with gradient checkpointing, ours at its best (more tokens per step than the anchor) /
           ours_fsdp_sgd_compiled / ours_fsdp_adamw_compiled: ours_fsdp_sgd / ours_fsdp_adamw with model.compile
           / ours_fsdp_sgd_compiled_sdpa: ours_fsdp_sgd_compiled with sdpa, rows padded to a multiple of 64 only.
           Each ours configuration compares with the naive run of its optimizer; no --cap unless given.

The naive baseline (naive_lora; every ratio of the 7b suite is against it, measured in the same invocation) is
what a user writes from the transformers and peft docs, with nothing of samsum_tuner in its training loop:
`AutoModelForCausalLM.from_config` in bf16 (it stands in for from_pretrained: random weights, no download;
sdpa, the default attention), `get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05,
target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))` (peft keeps the adapters in fp32), a plain
`transformers.Trainer` with `TrainingArguments(per_device_train_batch_size=8, bf16=True)` and the defaults
otherwise (the fused AdamW, linear schedule, pinned memory, the NaN filter of the logged loss, no gradient
checkpointing, no accumulation, a log line every 500 steps), and `DataCollatorForSeq2Seq(tokenizer,
padding="longest", label_pad_token_id=-100)`. Set only to run it here: output_dir, max_steps,
save_strategy="no", report_to="none", disable_tqdm=True, use_cache=False in the model config (what the Trainer
sets in transformers 5.25). The benchmark's own parts are the same for every configuration and read the GPU
back at the timed window's two ends only: a callback reads the clock there (after a sync), and a wrapper of the
collator adds up, on the host, the lengths of the samples each batch is made of (real tokens: no pads, no
packed row's padding tail, each sample's EOS included).

One tokenizer and vocabulary for every configuration of a run: random:llama2-7b is Llama-2-7B's shape with the
49,152-token vocabulary of SmolLM2's tokenizer, which samsum_tuner ships (Llama-2's own tokenizer is not
available offline), so all sides read the same token stream. The larger vocabulary costs a run in proportion to
the positions it computes logits for: the naive run all of them, padding included, ours only where a summary
token is predicted. naive_lora_v32k measures that part of the naive run: the same rows with every token id
folded into Llama-2's 32,000 (same lengths, same padding), a model of Llama-2-7B's exact shape.
MFU counts against 794 TFLOP/s per GPU (dense bf16 measured on an H100; the H200 has the same chip), N being
Llama-2-7B's 6.74B parameters.
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import TrainingArguments

from proctree import run

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PEAK_FLOPS = 794e12
DEFAULT_CAP = 79.2
# BENCH_MODEL=<a tiny model folder> runs the whole script on a CPU in seconds (a check of the script itself).
MODEL = os.environ.get("BENCH_MODEL", "random:llama2-7b")
# The smollm2 suite's model folder; unset: the embedded SmolLM2 (its GGUF converted). --smollm2 random sets it.
SMOLLM2_DIR = os.environ.get("BENCH_SMOLLM2")
# What SmolLM2-135M-Instruct's config.json adds to its shape (samsum_tuner.shapes): RoPE, context and token ids, for
# a model of random weights (--smollm2 random).
SMOLLM2_EXTRAS = dict(head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# flex_attention has no backward and bf16 is slow on a CPU: the check there swaps them out.
FLEX = "flex_attention" if DEVICE == "cuda" else "sdpa"
CPU_OVERRIDES = [] if DEVICE == "cuda" else ["model.attn_implementation=sdpa", "train.bf16=false"]


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


SUITES = {
    "7b": ["naive_lora", "flex_lora_b16", "ours_lora", "ours_lora_eager", "ours_lora_2k", "naive_lora_v32k",
           "ours_lora_liger", "ours_lora_liger_compiled", "ours_lora_bf16_adapters", "ours_lora_varlen"],
    "qlora": ["naive_qlora", "ours_qlora", "ours_qlora_eager", "naive_qlora_ckpt", "ours_qlora_2k",
              "ours_qlora_varlen"],
    # The flex loop last: first on a cold GPU machine it took 194 s (session 2026-11-30), most of it its first
    # flex_attention compilations, and it can take a call's whole deadline.
    "smollm2": ["trl_default", "ours_smollm2", "ours_smollm2_eager", "ours_smollm2_32k", "flex_loop_16k",
                "ours_smollm2_64k", "ours_smollm2_cudagraphs", "ours_smollm2_liger",
                "ours_smollm2_varlen", "ours_smollm2_foreach", "ours_smollm2_cpp_wrapper", "ours_smollm2_workers",
                "ours_smollm2_layers"],
    # Pairs first: a run cut short by its deadline still has something to compare.
    "fsdp": ["naive_fsdp_adamw", "ours_fsdp_adamw", "naive_fsdp_sgd", "ours_fsdp_sgd", "ours_fsdp_adamw_big",
             "ours_fsdp_sgd_compiled", "ours_fsdp_adamw_compiled", "ours_fsdp_sgd_compiled_sdpa"],
}
BASELINE = {"7b": ("naive_lora", "flex_lora_b16"), "qlora": ("naive_qlora", None),
            "smollm2": ("trl_default", "flex_loop_16k"), "fsdp": ("naive_fsdp_adamw", None)}
# Configurations of these suites run under accelerate launch, one process per GPU.
MULTI_GPU_SUITES = {"fsdp"}


# ---------------------------------------------------------------- shared pieces
def _recipe(path: str | None, overrides: list[str]):
    from samsum_tuner import load_recipe

    if SMOLLM2_DIR and path and "smollm2" in path:  # --smollm2 random: every SmolLM2 run, ours and the baselines'
        overrides = [f"model.name={SMOLLM2_DIR}", *overrides]

    return load_recipe(path, ["train.report_to=[]", "train.save_strategy=no", "train.save_model=false",
                              "train.eval_strategy=no", "train.disable_tqdm=true", "train.logging_steps=1000",
                              "train.overwrite_output_dir=true", *overrides])


def _stream(recipe, rows: int):
    """Tokenized SAMSum train rows, as samsum_tuner prepares them (the prompt of `recipe`)."""
    from samsum_tuner.api import _tokenized
    from dataclasses import replace

    tokenizer, splits = _tokenized(recipe, replace(recipe.data, split_slice=f"[:{rows}]", eval_split=None))
    return splits["train"].dataset, tokenizer


TOKENS_KEY = "bench_real_tokens"  # a batch's real tokens, sent by a loader process (Timer.count)


class Timer:
    """Times optimizer steps warmup+1 .. warmup+steps and counts their real tokens, reading the GPU at the
    window's two ends only (a read every step would stall the host's queue of launches, costing a fast step more
    than a slow one): the clock after a sync there, and the tokens that `count(trainer)` added up on the host
    as the collator made each batch (the lengths of its samples). With one batch per optimizer step the n-th
    batch made is the n-th step's, however far ahead the loader prefetches. Each step's own time comes from CUDA
    events recorded in the queue and read after the closing sync."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                if args.gradient_accumulation_steps != 1:
                    raise ValueError("Timer counts one batch per optimizer step: gradient_accumulation_steps=1")

            def on_step_end(self, args, state, control, **kw):
                if warmup <= state.global_step <= state.max_steps:
                    timer.marks.append(_mark())
                if state.global_step not in (warmup, state.max_steps):
                    return
                _sync()
                if state.global_step == warmup:
                    timer.t0 = time.perf_counter()
                else:
                    timer.t1, timer.steps = time.perf_counter(), state.global_step - warmup

        self.callback = _CB()
        self.warmup = warmup
        self.batch_tokens: list[int] = []
        self.t0 = self.t1 = None
        self.steps = 0
        self.marks: list = []  # one per timed step's end (and the warm-up's last): each step's own time

    def count(self, trainer) -> None:
        """Counts each batch's real tokens (the lengths of its samples) as the trainer's collator makes it (the
        collator is read when train() builds its loader). A collator in loader processes cannot append here: there
        each batch carries its count, taken off as the Trainer pulls the batch, before the model sees it."""
        collator, pull = trainer.data_collator, trainer.get_batch_samples

        def tokens(features):
            return sum(len(f["input_ids"]) for f in features)

        def collate(features):
            self.batch_tokens.append(tokens(features))
            return collator(features)

        def collate_in_worker(features):
            return {**collator(features), TOKENS_KEY: tokens(features)}

        def get_batch_samples(*args, **kwargs):
            batches, num_items = pull(*args, **kwargs)
            self.batch_tokens.extend(batch.pop(TOKENS_KEY) for batch in batches)
            return batches, num_items

        if trainer.args.dataloader_num_workers:
            trainer.data_collator, trainer.get_batch_samples = collate_in_worker, get_batch_samples
        else:
            trainer.data_collator = collate

    def result(self) -> dict:
        dt = self.t1 - self.t0
        tokens = _sum_over_ranks(sum(self.batch_tokens[self.warmup:self.warmup + self.steps]))
        step_ms = [round(_ms_between(a, b), 1) for a, b in zip(self.marks, self.marks[1:])]
        return {"timed_steps": self.steps, "s_per_step": dt / self.steps, "real_tokens_per_s": tokens / dt,
                "real_tokens_per_step": tokens / self.steps, "step_ms": step_ms,
                "median_step_ms": statistics.median(step_ms) if step_ms else None}


def _mark():
    """A point in the step stream: a CUDA event recorded in the queue (read after the window's closing sync, so
    no step waits for it), else the host clock."""
    if DEVICE != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _ms_between(a, b) -> float:
    return a.elapsed_time(b) if DEVICE == "cuda" else 1000 * (b - a)


def _sum_over_ranks(n: int) -> int:
    """n summed over the processes of a multi-GPU run (each counts the batches of its own loader)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return n
    total = torch.tensor([n], device=DEVICE)
    dist.all_reduce(total)
    return int(total.item())


def _hf_args(out: str, steps: int, batch: int, **overrides):
    """The naive runs' TrainingArguments: the defaults, bf16 on a GPU, and what running here needs."""
    return TrainingArguments(**{**dict(output_dir=out, max_steps=steps, per_device_train_batch_size=batch,
                                       bf16=DEVICE == "cuda", use_cpu=DEVICE == "cpu", save_strategy="no",
                                       report_to="none", disable_tqdm=True),
                                **overrides})


def _random_7b(attn: str, dtype: torch.dtype = torch.bfloat16, vocab_size: int | None = None):
    from transformers import AutoModelForCausalLM

    from samsum_tuner.model_source import load_model_config

    config = load_model_config(_recipe(None, [f"model.name={MODEL}"]).model)
    config._attn_implementation = attn
    config.use_cache = False
    if vocab_size:
        config.vocab_size = vocab_size
    with torch.device(DEVICE):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _fsdp_units(trainer) -> int:
    """FSDP-wrapped modules in the model the Trainer trained (0: no sharding): the proof that FSDP engaged."""
    from torch.distributed.fsdp import FSDPModule

    return sum(isinstance(m, FSDPModule) for m in trainer.model_wrapped.modules())


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))


def _trainer_run(model, tokenizer, dataset, batch: int, a, collator=None, **args) -> dict:
    """A plain transformers.Trainer with its defaults (the naive and off-the-shelf runs)."""
    from transformers import DataCollatorForSeq2Seq, Trainer

    timer = Timer(a.warmup)
    collator = collator or DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100,
                                                  return_tensors="pt")
    trainer = Trainer(model=model, args=_hf_args("/tmp/bench_run", a.warmup + a.steps, batch, **args),
                      train_dataset=dataset, data_collator=collator, processing_class=tokenizer,
                      callbacks=[timer.callback])
    timer.count(trainer)
    trainer.train()
    return {**timer.result(), "fsdp_units": _fsdp_units(trainer)}


# ---------------------------------------------------------------- configurations
LLAMA2_VOCAB = 32000


def naive_lora(a) -> dict:
    """The baseline of the module docstring: plain Trainer + peft, bf16 weights, pad-to-longest batches of 8, sdpa."""
    recipe = _recipe(None, [f"model.name={MODEL}"])
    dataset, tokenizer = _stream(recipe, a.rows)
    model = _lora(_random_7b("sdpa"))
    return _trainer_run(model, tokenizer, dataset, 8, a)


def naive_lora_v32k(a) -> dict:
    """naive_lora on Llama-2's own vocabulary: the same rows with their ids folded into 32,000 (same lengths and
    padding, so the same real tokens), against a model of Llama-2-7B's exact shape."""
    recipe = _recipe(None, [f"model.name={MODEL}"])
    dataset, tokenizer = _stream(recipe, a.rows)

    def fold(row):
        return {k: [t % LLAMA2_VOCAB if t >= 0 else t for t in row[k]] for k in ("input_ids", "labels")}

    dataset = dataset.map(fold, keep_in_memory=True)
    model = _lora(_random_7b("sdpa", vocab_size=LLAMA2_VOCAB))
    return {**_trainer_run(model, tokenizer, dataset, 8, a), "vocab_size": LLAMA2_VOCAB}


def flex_lora_b16(a) -> dict:
    """What a peer user gets by switching padding-free on: flattening collator + flex_attention, batch 16."""
    from transformers import DataCollatorWithFlattening

    recipe = _recipe(None, [f"model.name={MODEL}"])
    dataset, tokenizer = _stream(recipe, a.rows)
    model = _lora(_random_7b(FLEX))
    return _trainer_run(model, tokenizer, dataset, 16, a,
                        collator=DataCollatorWithFlattening(return_position_ids=True, separator_id=-100))


def _naive_qlora(a, checkpointing: bool) -> dict:
    """The naive run over an NF4 base (bf16 compute, double quantization), prepared by peft's
    prepare_model_for_kbit_training (fp32 norms and embeddings, input gradients; gradient checkpointing if asked)."""
    from peft import prepare_model_for_kbit_training

    from transformers import BitsAndBytesConfig

    from samsum_tuner.model import quantize_linears

    recipe = _recipe(None, [f"model.name={MODEL}", "quantization.bits=4", "lora.enabled=true"])
    dataset, tokenizer = _stream(recipe, a.rows)
    model = _random_7b("sdpa")
    # QLoRA's NF4 with double quantization and bf16 compute, as the peft/bitsandbytes docs configure it
    quantize_linears(model, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
    model = _lora(prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing))
    return {**_trainer_run(model, tokenizer, dataset, 8, a), "gradient_checkpointing": checkpointing}


def naive_qlora(a) -> dict:
    """Without gradient checkpointing: the faster naive QLoRA, so ratios against it do not read high."""
    return _naive_qlora(a, checkpointing=False)


def naive_qlora_ckpt(a) -> dict:
    """prepare_model_for_kbit_training(model) as the docs call it: its default turns gradient checkpointing on."""
    return _naive_qlora(a, checkpointing=True)


def _smollm2_dir() -> str:
    from samsum_tuner.smollm2 import embedded_model_dir

    return SMOLLM2_DIR or str(embedded_model_dir())


def random_smollm2(folder: Path) -> str:
    """SmolLM2-135M's shape with random weights and its tokenizer, as a model folder (built once): the speed of a
    step does not depend on the weights, and a GPU machine needs no GGUF for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from samsum_tuner.shapes import LLAMA_SHAPES
    from samsum_tuner.smollm2 import embedded_tokenizer

    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        shape = {k: v for k, v in dataclasses.asdict(LLAMA_SHAPES["smollm2-135m"]).items() if v is not None}
        LlamaForCausalLM(LlamaConfig(**shape, **SMOLLM2_EXTRAS)).save_pretrained(folder)
        embedded_tokenizer().save_pretrained(folder)
    return str(folder)


def _ours(a, path: str, overrides: list[str]) -> dict:
    """samsum_tuner's own path: recipe -> build_trainer -> trainer.train(); also how long it waited for its first
    optimizer step (samsum_tuner's FirstStepTimer: load, compilation)."""
    from samsum_tuner import build_trainer
    from samsum_tuner.model import compiles
    from samsum_tuner.callbacks import FirstStepTimer

    recipe = _recipe(path, [f"data.split_slice=[:{a.rows}]", f"train.max_steps={a.warmup + a.steps}",
                            "train.output_dir=/tmp/bench_ours", "data.longest_first=false", *overrides,
                            *CPU_OVERRIDES])
    timer = Timer(a.warmup)
    trainer = build_trainer(recipe, callbacks=[timer.callback])
    timer.count(trainer)
    if a.profile:
        _profile_last_steps(trainer, a)
    trainer.train()
    first_step = next(cb.summary for cb in trainer.callback_handler.callbacks if isinstance(cb, FirstStepTimer))
    return {**timer.result(), "fsdp_units": _fsdp_units(trainer), "compiled": compiles(recipe.model), **first_step}


def _profile_last_steps(trainer, a) -> None:
    """A torch.profiler table of 3 timed steps (written beside the results): where the step's time goes."""
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import TrainerCallback

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                   schedule=schedule(wait=a.warmup, warmup=1, active=3, repeat=1))

    class _Prof(TrainerCallback):
        def on_train_begin(self, *args, **kw):
            prof.start()

        def on_step_end(self, *args, **kw):
            prof.step()

        def on_train_end(self, *args, **kw):
            prof.stop()
            if int(os.environ.get("RANK", 0)) == 0:  # under FSDP every rank profiles; one table is enough
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
                Path(a.out, f"profile_{a.config}.txt").write_text(table)
                if a.trace:  # the timeline: where the GPU waits on the host, and for what
                    raw = Path(a.out, f"trace_{a.config}.json")
                    prof.export_chrome_trace(str(raw))
                    with raw.open("rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    raw.unlink()

    trainer.add_callback(_Prof())


def ours_lora(a) -> dict:
    return _ours(a, "recipes/lora_fast.yaml", [f"model.name={MODEL}"])


def ours_lora_eager(a) -> dict:
    return _ours(a, "recipes/lora_fast.yaml", [f"model.name={MODEL}", "model.compile=false"])


def ours_lora_2k(a) -> dict:
    """The peak target is set at the naive run's real tokens per step: the recipe at 2,048 tokens."""
    return _ours(a, "recipes/lora_fast.yaml", [f"model.name={MODEL}", "data.max_tokens_per_batch=2048",
                                               "data.pad_to_multiple_of=2048"])


def ours_lora_liger(a) -> dict:
    """Liger's Triton kernels (RMSNorm, SwiGLU, RoPE; transformers' use_liger_kernel) instead of compiling."""
    return _ours(a, "recipes/lora_fast.yaml", [f"model.name={MODEL}", "model.compile=false",
                                               "train.use_liger_kernel=true"])


def ours_lora_liger_compiled(a) -> dict:
    return _ours(a, "recipes/lora_fast.yaml", [f"model.name={MODEL}", "train.use_liger_kernel=true"])


def ours_lora_bf16_adapters(a) -> dict:
    """The adapters in the weights' bf16 (peft's autocast_adapter_dtype=False): no fp32 casts around them."""
    return _ours(a, "recipes/lora_fast.yaml", [f"model.name={MODEL}", "lora.autocast_adapter_dtype=false"])


def ours_lora_varlen(a) -> dict:
    """torch's variable-length FlashAttention over the packed rows' sample boundaries instead of flex_attention's
    block mask (CPU_OVERRIDES swap it for sdpa in the script's CPU check)."""
    return _ours(a, "recipes/lora_fast.yaml", [f"model.name={MODEL}", "model.attn_implementation=varlen_attn"])


def ours_qlora(a) -> dict:
    return _ours(a, "recipes/qlora_fast.yaml", [f"model.name={MODEL}"])


def ours_qlora_2k(a) -> dict:
    """The QLoRA peak target is set at the naive run's real tokens per step: the recipe at 2,048 tokens."""
    return _ours(a, "recipes/qlora_fast.yaml", [f"model.name={MODEL}", "data.max_tokens_per_batch=2048",
                                                "data.pad_to_multiple_of=2048"])


def ours_qlora_varlen(a) -> dict:
    return _ours(a, "recipes/qlora_fast.yaml", [f"model.name={MODEL}", "model.attn_implementation=varlen_attn"])


def ours_qlora_eager(a) -> dict:
    return _ours(a, "recipes/qlora_fast.yaml", [f"model.name={MODEL}", "model.compile=false"])


def ours_smollm2(a) -> dict:
    return _ours(a, "recipes/smollm2_gpu.yaml", [])


def ours_smollm2_eager(a) -> dict:
    return _ours(a, "recipes/smollm2_gpu.yaml", ["model.compile=false"])


def ours_smollm2_32k(a) -> dict:
    """Twice the tokens per step: the per-step launch overhead of a narrow model spread over more tokens."""
    return _ours(a, "recipes/smollm2_gpu.yaml", ["data.max_tokens_per_batch=32768", "data.pad_to_multiple_of=32768"])


def ours_smollm2_64k(a) -> dict:
    return _ours(a, "recipes/smollm2_gpu.yaml", ["data.max_tokens_per_batch=65536", "data.pad_to_multiple_of=65536"])


def ours_smollm2_layers(a) -> dict:
    """The recipe as committed before session 2026-12-07c: each decoder layer compiled in place, entered 30 times
    forward and 30 backward a step (session 2026-12-07c ran this as "ours_smollm2", and the recipe as now
    committed as "ours_smollm2_whole")."""
    return _ours(a, "recipes/smollm2_gpu.yaml", ["model.compile_scope=layers"])


def ours_smollm2_cudagraphs(a) -> dict:
    """The recipe's compiled stack replayed as CUDA graphs (torch.compile's reduce-overhead; session 2026-12-07c ran
    it as "ours_smollm2_whole_cudagraphs"; over layers compiled one by one it had run 18x slower)."""
    return _ours(a, "recipes/smollm2_gpu.yaml", ["model.compile_mode=reduce-overhead"])


def ours_smollm2_liger(a) -> dict:
    return _ours(a, "recipes/smollm2_gpu.yaml", ["model.compile=false", "train.use_liger_kernel=true"])


def ours_smollm2_varlen(a) -> dict:
    return _ours(a, "recipes/smollm2_gpu.yaml", ["model.attn_implementation=varlen_attn"])


def ours_smollm2_foreach(a) -> dict:
    """The recipe with torch's foreach AdamW instead of its fused one: the A/B that keeps the fused optimizer."""
    return _ours(a, "recipes/smollm2_gpu.yaml", ["train.optim=adamw_torch"])


def ours_smollm2_workers(a) -> dict:
    """Batches packed by two loader processes instead of the training process: the host builds the next ~16k-token
    row (6-9 ms in the 2026-12-06d trace, the GPU idle meanwhile) while the GPU runs the current step."""
    return _ours(a, "recipes/smollm2_gpu.yaml", ["train.dataloader_num_workers=2"])


def ours_smollm2_cpp_wrapper(a) -> dict:
    """The compiled layers launch their kernels from C++ (inductor's cpp_wrapper) rather than from Python: less
    host time per launch in a launch-bound step."""
    import torch._inductor.config

    torch._inductor.config.cpp_wrapper = True
    return _ours(a, "recipes/smollm2_gpu.yaml", [])


# The multi-GPU issue's anchor: full fine-tune, fp32 weights + bf16 mixed precision, lr 1e-5, 4 padded rows per GPU.
FSDP_LR = 1e-5
# The naive run's AdamW is the Trainer's default, as a naive user gets it (the fused kernel on torch >= 2.8); ours
# names the same one. Session 2026-11-29d ran both with "adamw_torch" (foreach).
ADAMW = TrainingArguments.__dataclass_fields__["optim"].default
NAIVE_ROWS_PER_GPU = 4
# FSDP comes from the accelerate launch (the Accelerator reads ACCELERATE_USE_FSDP and FSDP_*, the Trainer keeps
# its plugin), as for a user who runs `accelerate launch train.py`; samsum_tuner's recipe must agree (launch.py).
FSDP_ON = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def _naive_fsdp(a, optim: str) -> dict:
    """A plain Trainer: fp32 weights on the host of every rank (as from_pretrained leaves them), bf16 mixed
    precision, DataCollatorForSeq2Seq padding to the longest of 4 rows per GPU, sdpa, HF's `optim`."""
    recipe = _recipe(None, [f"model.name={MODEL}"])
    dataset, tokenizer = _stream(recipe, a.rows)
    # Random fp32 7-13B weights take minutes to draw on the host and seconds on the GPU. A checkpoint load has no
    # such GPU transient, so the peak counters restart once the weights are on the host.
    model = _random_7b("sdpa", torch.float32).to("cpu")
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return {**_trainer_run(model, tokenizer, dataset, NAIVE_ROWS_PER_GPU, a, optim=optim, learning_rate=FSDP_LR),
            "optim": optim}


def naive_fsdp_adamw(a) -> dict:
    return _naive_fsdp(a, ADAMW)


def naive_fsdp_sgd(a) -> dict:
    return _naive_fsdp(a, "sgd")


def _matching_budget(lengths: list[int], seed: int) -> int:
    """The packed token budget per GPU whose batches, as samsum_tuner forms them, hold on average as many real
    tokens as the naive run's padded batches (4 x the mean sample): the same real tokens per optimizer step.
    From the longest sample up, so that no sample is cut, in steps of 16 tokens (tensor-core friendly shapes)."""
    from samsum_tuner.batching import token_budget_batches

    total, target = sum(lengths), NAIVE_ROWS_PER_GPU * sum(lengths) / len(lengths)
    first = -(-max(lengths) // 16) * 16
    # Every sample is in exactly one batch: the mean real tokens per batch is the total over the batch count.
    return min(range(first, max(first, int(2 * target)) + 16, 16),
               key=lambda b: abs(total / len(token_budget_batches(lengths, b, True, seed)) - target))


def _ours_fsdp(a, optim: str, budget: int | None = None, extra: tuple[str, ...] = ()) -> dict:
    """samsum_tuner's full fine-tune fast path under the same launch: fp32 weights + bf16 mixed precision,
    padding-free packed rows padded to the budget (flex_attention compiles one shape), logits only where a
    summary token is predicted (train.supervised_logits_only, on by default)."""
    recipe = _recipe(None, [f"model.name={MODEL}"])
    if budget is None:
        from samsum_tuner.planning import train_lengths

        lengths = train_lengths(_recipe(None, [f"model.name={MODEL}", f"data.split_slice=[:{a.rows}]"]))[0]
        budget = _matching_budget(lengths, recipe.train.seed)
    out = _ours(a, None, [f"model.name={MODEL}", f"fsdp.enabled={str(FSDP_ON).lower()}", "train.bf16=true",
                          f"model.attn_implementation={FLEX}", "data.packing=true",
                          f"data.max_tokens_per_batch={budget}", f"data.pad_to_multiple_of={budget}",
                          # A budget must hold the longest sample allowed (data.max_length, 2048 by default).
                          f"data.max_length={min(budget, recipe.data.max_length)}",
                          "train.gradient_accumulation_steps=1", f"train.learning_rate={FSDP_LR}",
                          "train.max_grad_norm=1.0",  # the Trainer's default, which the naive run clips with
                          # HF's optim="sgd" has no momentum; samsum_tuner's SGD defaults to the original's 0.9
                          f"train.optim={optim}", *(["train.momentum=0"] if optim == "sgd" else []),
                          # as the naive run: no activation checkpointing, which FSDP recipes have unless told not to
                          "model.gradient_checkpointing=false", *extra])
    return {**out, "token_budget_per_gpu": budget, "optim": optim}


def ours_fsdp_adamw(a) -> dict:
    return _ours_fsdp(a, ADAMW)


def ours_fsdp_sgd(a) -> dict:
    return _ours_fsdp(a, "sgd")


def ours_fsdp_sgd_compiled(a) -> dict:
    return _ours_fsdp(a, "sgd", extra=("model.compile=true",))


def ours_fsdp_adamw_compiled(a) -> dict:
    return _ours_fsdp(a, ADAMW, extra=("model.compile=true",))


def ours_fsdp_sgd_compiled_sdpa(a) -> dict:
    """ours_fsdp_sgd_compiled with sdpa and rows padded to a multiple of 64 only, not to the budget: no matmul
    over padding (a fifth of the budget-padded row's tokens), at the cost of a shape that varies."""
    return _ours_fsdp(a, "sgd", extra=("model.compile=true", "model.attn_implementation=sdpa",
                                       "data.pad_to_multiple_of=64"))


def ours_fsdp_adamw_big(a) -> dict:
    """Ours at its best: 8,192 tokens per GPU, about 10x the anchor's real tokens per step (not like for like).
    Gradient checkpointing keeps the activations (about 40 GiB without it on 7B) under the naive run's peak."""
    out = _ours_fsdp(a, ADAMW, budget=8192, extra=("model.gradient_checkpointing=true",))
    return {**out, "note": "ours at its best: more real tokens per optimizer step than the naive anchor"}


def trl_default(a) -> dict:
    """TRL's SFTTrainer with its defaults (batch 8, gradient checkpointing) on prompt/completion messages."""
    from datasets import Dataset

    try:
        from trl import SFTConfig, SFTTrainer
    except ModuleNotFoundError as e:
        if e.name != "trl":
            raise
        raise SystemExit("trl_default needs TRL, an optional dependency: pip install -e '.[bench]'") from None

    from samsum_tuner.data import load_clean_split

    recipe = _recipe("recipes/smollm2_gpu.yaml", [])
    rows = load_clean_split(recipe.data, "train")[0][: a.rows]
    prompt = recipe.data.prompt_template
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": prompt.format(dialog=r["dialogue"])}],
                                  "completion": [{"role": "assistant", "content": r["summary"]}]} for r in rows])
    timer = Timer(a.warmup)
    config = SFTConfig(output_dir="/tmp/bench_trl", max_steps=a.warmup + a.steps, report_to="none",
                       save_strategy="no", disable_tqdm=True,
                       **({} if DEVICE == "cuda" else {"use_cpu": True, "bf16": False}))
    trainer = SFTTrainer(model=_smollm2_dir(), args=config, train_dataset=dataset,
                         callbacks=[timer.callback])
    timer.count(trainer)
    trainer.train()
    out = timer.result()
    out["settings"] = {k: getattr(config, k) for k in ("per_device_train_batch_size", "gradient_checkpointing",
                                                       "bf16", "padding_free", "packing", "max_length")}
    return out


def flex_loop_16k(a) -> dict:
    """The best off-the-shelf setup measured for SmolLM2: a plain loop over transformers' flattening collator,
    flex_attention, batches of up to 16,384 tokens, pure bf16 weights, AdamW."""
    from transformers import AutoModelForCausalLM, DataCollatorWithFlattening

    recipe = _recipe("recipes/smollm2_gpu.yaml", [])
    dataset, _ = _stream(recipe, a.rows)
    model = AutoModelForCausalLM.from_pretrained(_smollm2_dir(),
                                                 dtype=torch.bfloat16 if DEVICE == "cuda" else None,
                                                 attn_implementation=FLEX).to(DEVICE)
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    collate = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    batches, current, size = [], [], 0
    for row in dataset:
        if current and size + len(row["input_ids"]) > 16384:
            batches.append(current)
            current, size = [], 0
        current.append(row)
        size += len(row["input_ids"])
    t0 = tok = 0
    step_ms: list[float] = []
    if current:
        batches.append(current)
    started = last = time.perf_counter()
    for step in range(a.warmup + a.steps):
        rows = batches[step % len(batches)]
        batch = {k: v.to(DEVICE) for k, v in collate(rows).items()}
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        # Each step's time and shape on stderr, which a timed-out configuration keeps: on a cold GPU machine its
        # first compilations took most of its 194 s (session 2026-11-30) and had outlasted earlier limits.
        now = time.perf_counter()
        print(f"flex_loop_16k: step {step + 1}, {batch['input_ids'].shape[1]} tokens, "
              f"{now - started:.1f} s since start", file=sys.stderr, flush=True)
        if step + 1 == a.warmup:
            t0, tok = now, 0
        elif step + 1 > a.warmup:
            tok += batch["input_ids"].numel()
            step_ms.append(round(1000 * (now - last), 1))
        last = now
    dt = time.perf_counter() - t0
    return {"timed_steps": a.steps, "s_per_step": dt / a.steps, "real_tokens_per_s": tok / dt,
            "real_tokens_per_step": tok / a.steps, "step_ms": step_ms, "median_step_ms": statistics.median(step_ms)}


# Every configuration a suite names is the function of that name (one list to keep, not two).
CONFIGS = {name: globals()[name] for names in SUITES.values() for name in names}
FLOPS_PER_TOKEN = {"7b": 4 * 6.74e9, "qlora": 4 * 6.74e9, "smollm2": 6 * 134.5e6}
# Llama-2's parameter counts (the issue's N) for the fsdp suite's 6·N; another --model gets no MFU.
FULL_PARAMS = {"random:llama2-7b": 6.74e9, "random:llama2-13b": 13.0e9}


def _flops_per_token(suite: str, model: str) -> float | None:
    if suite == "fsdp":
        return 6 * FULL_PARAMS[model] if model in FULL_PARAMS else None
    return FLOPS_PER_TOKEN[suite]


# ---------------------------------------------------------------- driver
def run_config(a) -> None:
    cuda = DEVICE == "cuda"
    if cuda:
        # Before anything touches CUDA: otherwise every rank would also open a context on GPU 0.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if a.cap and cuda:
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, a.cap * 2**30 / torch.cuda.get_device_properties(0).total_memory))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    try:
        result = CONFIGS[a.config](a)
        result["status"] = "ok"
    except torch.OutOfMemoryError as e:
        result = {"status": "oom", "error": str(e).splitlines()[0][:300]}
    result.update(config=a.config, wall_s=round(time.time() - t, 1), gpus=int(os.environ.get("WORLD_SIZE", 1)),
                  device=torch.cuda.get_device_name() if cuda else "cpu", **_peaks(result["status"] == "ok"))
    if int(os.environ.get("RANK", 0)) == 0:
        Path(a.json_out).write_text(json.dumps(result, default=str))


def _peaks(gather: bool) -> dict:
    """Peak allocated and reserved GiB: the largest over the ranks, and each rank's. After a failure only this
    rank's: another rank may be stuck in a collective and never answer."""
    if DEVICE != "cuda":
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    ranks = [(round(torch.cuda.max_memory_allocated() / 2**30, 2), round(torch.cuda.max_memory_reserved() / 2**30, 2))]
    dist = torch.distributed
    if gather and dist.is_available() and dist.is_initialized():
        mine, ranks = ranks[0], [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
        dist.destroy_process_group()
    allocated, reserved = zip(*ranks)
    return {"peak_allocated_gib": max(allocated), "peak_reserved_gib": max(reserved),
            "per_rank_peak_allocated_gib": list(allocated), "per_rank_peak_reserved_gib": list(reserved)}


def _command(a, suite: str, name: str, target: Path, cap: float) -> list[str]:
    args = [__file__, "--config", name, "--json-out", str(target), "--out", str(a.out), "--rows", str(a.rows),
            "--warmup", str(a.warmup), "--steps", str(a.steps), "--cap", str(cap), "--profile", a.profile,
            *(["--trace"] if a.trace else [])]
    if suite not in MULTI_GPU_SUITES or (DEVICE == "cpu" and a.nproc == 1):
        # Without CUDA accelerate does not engage FSDP and samsum_tuner refuses an FSDP launch (launch.py): the
        # check of the script on a CPU runs its one process without the launcher.
        return [sys.executable, *args]
    # accelerate's module rather than its console script, which a --target install leaves off PATH. The launcher
    # would pin each rank to one CPU thread; host-side work (ours draws rank 0's fp32 weights there) gets a share.
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/fsdp4.yaml",
            "--num_processes", str(a.nproc), "--num_cpu_threads_per_process",
            str(max(1, (os.cpu_count() or 1) // a.nproc)), *args]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="7b,qlora,smollm2")
    p.add_argument("--only", default="",
                   help="comma-separated configurations instead of whole suites, run in this order")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--model", default=MODEL, help="the random shape or model folder of the 7b, qlora and fsdp suites")
    p.add_argument("--smollm2", choices=["embedded", "random"], default="embedded",
                   help="the smollm2 suite's model: the embedded SmolLM2, or its shape with random weights (no GGUF)")
    p.add_argument("--keep-stderr", action="store_true", help="write each run's stderr beside the results")
    p.add_argument("--nproc", type=int, default=torch.cuda.device_count() or 1,
                   help="processes (GPUs) of the fsdp suite's accelerate launch")
    p.add_argument("--rows", type=int, default=4096, help="train rows in the token stream")
    p.add_argument("--repeat", type=int, default=1, help="runs of each configuration, interleaved; ratios use "
                   "each baseline's median tokens/s")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cap", type=float, default=None,
                   help=f"GiB per process; 0 = none; default {DEFAULT_CAP} (an H100 80GB on an H200), none for fsdp")
    p.add_argument("--profile", default="ours_lora", help="configurations that also write a profiler table")
    p.add_argument("--trace", action="store_true", help="the profiled configurations also write a gzipped "
                   "chrome trace (trace_<config>.json.gz)")
    p.add_argument("--timeout", type=int, default=400, help="per configuration")
    p.add_argument("--deadline", type=float, default=0,
                   help="seconds from start after which no configuration starts (a device call has a hard limit)")
    p.add_argument("--warm", default="", metavar="CONFIG",
                   help="run CONFIG once before the others, outside the comparison: the first GPU process on a fresh "
                   "machine runs slower (docs/throughput.md), and no measured run should be that one")
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.config:
        a.profile = a.config in a.profile.split(",")
        return run_config(a)
    if a.nproc > 1 and DEVICE == "cpu":
        p.error("--nproc above 1 needs CUDA GPUs (FSDP does not run on a CPU)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # --only runs in the order given (a device call puts first what must not meet its deadline), else suite order.
    suite_of = {c: s for s in a.suite.split(",") for c in SUITES[s]}
    wanted = a.only.split(",") if a.only else list(suite_of)
    if unknown := [c for c in wanted + ([a.warm] if a.warm else []) if c not in suite_of]:
        p.error(f"--only/--warm: {', '.join(unknown)} not in --suite {a.suite}")
    # Repeats interleave (A B A B ...): on a shared host one configuration's samples do not all fall in a slow spell.
    plan = [(suite_of[c], c, n + 1) for n in range(a.repeat) for c in wanted]
    if a.warm:
        plan.insert(0, (suite_of[a.warm], a.warm, "warm-up"))
    env = {**os.environ, "BENCH_MODEL": a.model}
    if a.smollm2 == "random" and "smollm2" in a.suite.split(","):
        env["BENCH_SMOLLM2"] = random_smollm2(out / "smollm2_random")
    results: list[dict] = []
    start = time.time()
    for suite, name, repeat in plan:
        left = a.deadline - (time.time() - start) if a.deadline else a.timeout
        if left < 30:
            results.append({"config": name, "suite": suite, "status": "not run (deadline)"})
            continue
        target = out / f"_{name}.json"
        target.unlink(missing_ok=True)  # a result left by an earlier call is not this one's
        # The cap imitates an 80 GB card; the multi-GPU suite is about the H200s themselves.
        cap = a.cap if a.cap is not None else 0 if suite in MULTI_GPU_SUITES else DEFAULT_CAP
        # Stopped with every process it started; at a timeout faulthandler prints every thread's stack (SIGABRT)
        # before the kill, so the stderr tail says what it was doing (compiling? waiting on a collective?).
        code, _, stderr = run(_command(a, suite, name, target, cap), min(a.timeout, left), signal.SIGABRT, cwd=ROOT,
                              env={**env, "PYTHONFAULTHANDLER": "1"})
        if a.keep_stderr:  # torch's logs (TORCH_LOGS=perf_hints: why CUDA graphs were skipped) of runs that worked
            (out / f"stderr_{name}_{repeat}.txt").write_text(stderr[-200_000:])
        if target.is_file():
            r = json.loads(target.read_text())
        else:
            # faulthandler's list of extension modules would fill the tail that the stacks need
            stderr = "\n".join(x for x in stderr.splitlines() if "Extension modules:" not in x)
            r = {"config": name, "status": "timeout" if code is None else f"failed({code})",
                 "stderr_tail": stderr[-4000:]}
        r.update(suite=suite, cap_gib=cap, **({"repeat": repeat} if a.repeat > 1 or repeat == "warm-up" else {}))
        flops = _flops_per_token(suite, a.model)
        if r.get("real_tokens_per_s") and flops:
            r["mfu_pct"] = round(100 * flops * r["real_tokens_per_s"] / (PEAK_FLOPS * r.get("gpus", 1)), 1)
        results.append(r)
        print(json.dumps({k: r.get(k) for k in ("suite", "config", "status", "real_tokens_per_s", "mfu_pct",
                                                "peak_allocated_gib", "per_rank_peak_allocated_gib", "s_per_step",
                                                "median_step_ms",
                                                "real_tokens_per_step", "token_budget_per_gpu", "fsdp_units",
                                                "compiled", "first_step_after_launch_s", "first_step_s", "wall_s",
                                                "stderr_tail")}), flush=True)
        _ratios(results)
        # Written after every configuration: a call cut short keeps what it measured.
        (out / "throughput.json").write_text(json.dumps({
            "command": " ".join(sys.argv), "cap_gib": a.cap, "model": a.model, "rows": a.rows, "warmup": a.warmup,
            "steps": a.steps, "nproc": a.nproc, "device": next((r["device"] for r in results if r.get("device")), None),
            "results": results}, indent=1, default=str))
    for r in results:
        print(f"{r['suite']:8s} {r['config']:20s} #{r.get('repeat', 1)} {r['status']:8s} "
              f"tok/s {r.get('real_tokens_per_s') or 0:>9.0f}  "
              f"tok/step {r.get('real_tokens_per_step') or 0:>7.0f}  MFU {r.get('mfu_pct', 0):>5}%  "
              f"peak {r.get('peak_allocated_gib')} GiB  x {r.get('naive', 'naive')} {r.get('x_naive')}  "
              f"x off-the-shelf {r.get('x_offshelf')}  peak/naive {r.get('peak_vs_naive')}")


def _ratios(results: list[dict]) -> None:
    """Each run against its naive anchor and its suite's off-the-shelf baseline: tokens/s against the baseline's
    median tokens/s when repeated (of an even count, the mean of the middle two: the lower one would favour the
    runs measured against it), peak memory against its median run's (the lower middle one of an even count). A
    --warm run gets its ratios too but is no baseline: it ran on the machine as it was."""
    runs: dict[str, list[dict]] = {}  # each configuration's measured runs, in run order
    for r in results:
        if r.get("real_tokens_per_s") and r.get("repeat") != "warm-up":
            runs.setdefault(r["config"], []).append(r)
    medians = {c: sorted(rs, key=lambda r: r["real_tokens_per_s"])[(len(rs) - 1) // 2] for c, rs in runs.items()}
    median_tokens = {c: statistics.median(r["real_tokens_per_s"] for r in rs) for c, rs in runs.items()}
    for r in results:
        naive, offshelf = BASELINE[r["suite"]]
        if r["suite"] == "fsdp" and "_sgd" in r["config"]:  # like with like: an SGD run against the naive SGD run
            naive = "naive_fsdp_sgd"
        by = {c: x for c, x in medians.items() if x["suite"] == r["suite"]}
        if len(runs.get(r["config"], [])) > 1:
            r["repeat_tokens_per_s"] = [round(x["real_tokens_per_s"]) for x in runs[r["config"]]]
            r["median_of_repeats"] = medians[r["config"]] is r
        r["naive"] = naive
        for base, key in ((naive, "x_naive"), (offshelf, "x_offshelf")):
            if base in by and r.get("real_tokens_per_s"):
                r[key] = round(r["real_tokens_per_s"] / median_tokens[base], 2)
        if by.get(naive, {}).get("peak_allocated_gib") and r.get("peak_allocated_gib"):
            r["peak_vs_naive"] = round(r["peak_allocated_gib"] / by[naive]["peak_allocated_gib"], 2)


if __name__ == "__main__":
    main()
