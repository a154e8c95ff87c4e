"""Real (non-pad) tokens/s of samsum_tuner against the baselines of the throughput issue, in one invocation,
on the same GPU and the same SAMSum token stream (the first --rows rows of the train split).

    python benchmarks/throughput.py --suite 7b,qlora,smollm2 --out results_dir [--cap 79.2]

Each configuration runs in its own process (no compile cache, allocator state or flex-attention singleton
carries over) for --warmup + --steps optimizer steps; the timed window is the last --steps. Suites:
  7b       random Llama-2-7B shape, LoRA r=8 on q_proj,v_proj, bf16 weights (4·N FLOPs per token for MFU):
           naive Trainer + peft, padded batches of 8, sdpa / Trainer + DataCollatorWithFlattening + flex
           batch 16 / samsum_tuner recipes/lora_fast.yaml / the same at 2,048 tokens per step (memory at
           about the naive run's real tokens per step)
  qlora    the same shape in NF4: naive padded batch 8 / samsum_tuner recipes/qlora_fast.yaml
  smollm2  the embedded SmolLM2-135M, full fine-tune (6·N): TRL SFTTrainer defaults / a plain loop over the
           flattening collator with flex attention and a 16k-token budget / samsum_tuner recipes/smollm2_gpu.yaml
MFU counts against 794 TFLOP/s (dense bf16 measured on an H100; the H200 has the same chip).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PEAK_FLOPS = 794e12
# BENCH_MODEL=<a tiny model folder> runs the whole script on a CPU in seconds (a check of the script itself).
MODEL = os.environ.get("BENCH_MODEL", "random:llama2-7b")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# flex_attention has no backward and bf16 is slow on a CPU: the check there swaps them out.
FLEX = "flex_attention" if DEVICE == "cuda" else "sdpa"
CPU_OVERRIDES = [] if DEVICE == "cuda" else ["model.attn_implementation=sdpa", "train.bf16=false"]


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
SUITES = {
    "7b": ["naive_lora", "flex_lora_b16", "ours_lora", "ours_lora_2k"],
    "qlora": ["naive_qlora", "ours_qlora"],
    "smollm2": ["trl_default", "flex_loop_16k", "ours_smollm2"],
}
BASELINE = {"7b": ("naive_lora", "flex_lora_b16"), "qlora": ("naive_qlora", None),
            "smollm2": ("trl_default", "flex_loop_16k")}


# ---------------------------------------------------------------- shared pieces
def _recipe(path: str | None, overrides: list[str]):
    from samsum_tuner import load_recipe

    return load_recipe(path, ["train.report_to=[]", "train.save_strategy=no", "train.save_model=false",
                              "train.eval_strategy=no", "train.disable_tqdm=true", "train.logging_steps=1000",
                              "train.overwrite_output_dir=true", *overrides])


def _stream(recipe, rows: int):
    """Tokenized SAMSum train rows, as samsum_tuner prepares them (the prompt of `recipe`)."""
    from samsum_tuner.api import _tokenized
    from dataclasses import replace

    tokenizer, splits = _tokenized(recipe, replace(recipe.data, split_slice=f"[:{rows}]", eval_split=None))
    return splits["train"].dataset, tokenizer


class Timer:
    """Times optimizer steps warmup+1 .. warmup+steps; tokens from the Trainer's non-padding count."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                _sync()
                if state.global_step == warmup:
                    timer.t0, timer.tok0 = time.perf_counter(), int(state.num_input_tokens_seen)
                timer.t1, timer.tok1, timer.steps = time.perf_counter(), int(state.num_input_tokens_seen), \
                    state.global_step - warmup

        self.callback = _CB()
        self.t0 = self.t1 = None
        self.tok0 = self.tok1 = self.steps = 0

    def result(self) -> dict:
        dt = self.t1 - self.t0
        return {"timed_steps": self.steps, "s_per_step": dt / self.steps,
                "real_tokens_per_s": (self.tok1 - self.tok0) / dt, "real_tokens_per_step": (self.tok1 - self.tok0) / self.steps}


def _hf_args(out: str, steps: int, batch: int):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, bf16=DEVICE == "cuda",
                             use_cpu=DEVICE == "cpu",
                             learning_rate=1e-4, logging_steps=1000, save_strategy="no", report_to=[],
                             disable_tqdm=True, include_num_input_tokens_seen="non_padding",
                             remove_unused_columns=False)


def _random_7b(attn: str):
    from transformers import AutoModelForCausalLM

    from samsum_tuner.model import load_model_config

    config = load_model_config(_recipe(None, [f"model.name={MODEL}"]))
    config._attn_implementation = attn
    config.use_cache = False
    with torch.device(DEVICE):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))


def _trainer_run(model, tokenizer, dataset, batch: int, steps: int, warmup: int, collator=None) -> dict:
    from transformers import DataCollatorForSeq2Seq, Trainer

    timer = Timer(warmup)
    collator = collator or DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100,
                                                  return_tensors="pt")
    trainer = Trainer(model=model, args=_hf_args("/tmp/bench_run", warmup + steps, batch), train_dataset=dataset,
                      data_collator=collator, processing_class=tokenizer, callbacks=[timer.callback])
    trainer.train()
    return timer.result()


# ---------------------------------------------------------------- configurations
def naive_lora(a) -> dict:
    """The anchor: transformers.Trainer + peft, bf16 weights, pad-to-longest batches of 8, sdpa."""
    recipe = _recipe(None, [f"model.name={MODEL}"])
    dataset, tokenizer = _stream(recipe, a.rows)
    model = _lora(_random_7b("sdpa"))
    return _trainer_run(model, tokenizer, dataset, 8, a.steps, a.warmup)


def flex_lora_b16(a) -> dict:
    """What a peer user gets by switching padding-free on: flattening collator + flex_attention, batch 16."""
    from transformers import DataCollatorWithFlattening

    recipe = _recipe(None, [f"model.name={MODEL}"])
    dataset, tokenizer = _stream(recipe, a.rows)
    model = _lora(_random_7b(FLEX))
    return _trainer_run(model, tokenizer, dataset, 16, a.steps, a.warmup,
                               collator=DataCollatorWithFlattening(return_position_ids=True, separator_id=-100))


def naive_qlora(a) -> dict:
    """Naive QLoRA: NF4 base (bf16 compute), prepare_model_for_kbit_training, peft, padded batches of 8."""
    from peft import prepare_model_for_kbit_training

    from samsum_tuner.model import quantize_linears

    recipe = _recipe(None, [f"model.name={MODEL}", "quantization.bits=4", "lora.enabled=true"])
    dataset, tokenizer = _stream(recipe, a.rows)
    model = _random_7b("sdpa")
    quantize_linears(model, recipe, torch.bfloat16, fsdp=False)
    model = _lora(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False))
    return _trainer_run(model, tokenizer, dataset, 8, a.steps, a.warmup)


def _ours(a, path: str, overrides: list[str]) -> dict:
    """samsum_tuner's own path: recipe -> build_trainer -> trainer.train()."""
    from samsum_tuner import build_trainer

    recipe = _recipe(path, [f"data.split_slice=[:{a.rows}]", f"train.max_steps={a.warmup + a.steps}",
                            "train.output_dir=/tmp/bench_ours", "data.longest_first=false", *overrides,
                            *CPU_OVERRIDES])
    timer = Timer(a.warmup)
    trainer = build_trainer(recipe, callbacks=[timer.callback])
    if a.profile:
        _profile_last_steps(trainer, a)
    trainer.train()
    return timer.result()


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
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
            Path(a.out, f"profile_{a.config}.txt").write_text(table)

    trainer.add_callback(_Prof())


def ours_lora(a) -> dict:
    return _ours(a, "recipes/lora_fast.yaml", [f"model.name={MODEL}"])


def ours_lora_2k(a) -> dict:
    return _ours(a, "recipes/lora_fast.yaml", [f"model.name={MODEL}", "data.max_tokens_per_batch=2048",
                                               "data.pad_to_multiple_of=2048"])


def ours_qlora(a) -> dict:
    return _ours(a, "recipes/qlora_fast.yaml", [f"model.name={MODEL}"])


def ours_smollm2(a) -> dict:
    return _ours(a, "recipes/smollm2_gpu.yaml", [])


def trl_default(a) -> dict:
    """TRL's SFTTrainer with its defaults (batch 8, gradient checkpointing) on prompt/completion messages."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from samsum_tuner.data import load_clean_split
    from samsum_tuner.model import embedded_model_dir

    recipe = _recipe("recipes/smollm2_gpu.yaml", [])
    rows = load_clean_split(recipe.data, "train")[0][: a.rows]
    prompt = recipe.data.prompt_template
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": prompt.format(dialog=r["dialogue"])}],
                                  "completion": [{"role": "assistant", "content": r["summary"]}]} for r in rows])
    timer = Timer(a.warmup)
    config = SFTConfig(output_dir="/tmp/bench_trl", max_steps=a.warmup + a.steps, report_to=[], save_strategy="no",
                       logging_steps=1000, disable_tqdm=True, include_num_input_tokens_seen="non_padding",
                       **({} if DEVICE == "cuda" else {"use_cpu": True, "bf16": False}))
    trainer = SFTTrainer(model=str(embedded_model_dir()), args=config, train_dataset=dataset,
                         callbacks=[timer.callback])
    trainer.train()
    out = timer.result()
    out["settings"] = {k: getattr(config, k) for k in ("per_device_train_batch_size", "gradient_checkpointing",
                                                       "bf16", "padding_free", "packing", "max_length")}
    return out


def flex_loop_16k(a) -> dict:
    """The best off-the-shelf setup measured for SmolLM2: a plain loop over transformers' flattening collator,
    flex_attention, batches of up to 16,384 tokens, pure bf16 weights, AdamW."""
    from transformers import AutoModelForCausalLM, DataCollatorWithFlattening

    from samsum_tuner.model import embedded_model_dir

    recipe = _recipe("recipes/smollm2_gpu.yaml", [])
    dataset, _ = _stream(recipe, a.rows)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.bfloat16 if DEVICE == "cuda" else None,
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
    if current:
        batches.append(current)
    for step in range(a.warmup + a.steps):
        rows = batches[step % len(batches)]
        batch = {k: v.to(DEVICE) for k, v in collate(rows).items()}
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        if step + 1 == a.warmup:
            t0, tok = time.perf_counter(), 0
        elif step + 1 > a.warmup:
            tok += batch["input_ids"].numel()
    dt = time.perf_counter() - t0
    return {"timed_steps": a.steps, "s_per_step": dt / a.steps, "real_tokens_per_s": tok / dt,
            "real_tokens_per_step": tok / a.steps}


CONFIGS = {f.__name__: f for f in (naive_lora, flex_lora_b16, naive_qlora, ours_lora, ours_lora_2k, ours_qlora,
                                   trl_default, flex_loop_16k, ours_smollm2)}
FLOPS_PER_TOKEN = {"7b": 4 * 6.74e9, "qlora": 4 * 6.74e9, "smollm2": 6 * 134.5e6}


# ---------------------------------------------------------------- driver
def run_config(a) -> None:
    cuda = DEVICE == "cuda"
    if a.cap and cuda:
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.cap * 2**30 / torch.cuda.get_device_properties(0).total_memory))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    try:
        result = CONFIGS[a.config](a)
        result["status"] = "ok"
    except torch.OutOfMemoryError as e:
        result = {"status": "oom", "error": str(e).splitlines()[0][:300]}
    result.update(config=a.config, wall_s=round(time.time() - t, 1),
                  peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                  peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None)
    Path(a.json_out).write_text(json.dumps(result, default=str))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="7b,qlora,smollm2")
    p.add_argument("--only", default="", help="comma-separated configurations instead of whole suites")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--rows", type=int, default=4096, help="train rows in the token stream")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cap", type=float, default=79.2, help="GiB per process (an H100 80GB on an H200); 0 = none")
    p.add_argument("--profile", default="ours_lora", help="configurations that also write a profiler table")
    p.add_argument("--timeout", type=int, default=400, help="per configuration")
    p.add_argument("--deadline", type=float, default=0,
                   help="seconds from start after which no configuration starts (a device call has a hard limit)")
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.config:
        a.profile = a.config in a.profile.split(",")
        return run_config(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = [(s, c) for s in a.suite.split(",") for c in SUITES[s] if not a.only or c in a.only.split(",")]
    results: list[dict] = []
    start = time.time()
    for suite, name in plan:
        left = a.deadline - (time.time() - start) if a.deadline else a.timeout
        if left < 30:
            results.append({"config": name, "suite": suite, "status": "not run (deadline)"})
            continue
        target = out / f"_{name}.json"
        cmd = [sys.executable, __file__, "--config", name, "--json-out", str(target), "--out", str(out),
               "--rows", str(a.rows), "--warmup", str(a.warmup), "--steps", str(a.steps), "--cap", str(a.cap),
               "--profile", a.profile]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=min(a.timeout, left))
            r = json.loads(target.read_text()) if target.is_file() else {
                "config": name, "status": f"failed({proc.returncode})", "stderr_tail": proc.stderr[-1500:]}
        except subprocess.TimeoutExpired:
            r = {"config": name, "status": "timeout"}
        r["suite"] = suite
        if r.get("real_tokens_per_s"):
            r["mfu_pct"] = round(100 * FLOPS_PER_TOKEN[suite] * r["real_tokens_per_s"] / PEAK_FLOPS, 1)
        results.append(r)
        print(json.dumps({k: r.get(k) for k in ("suite", "config", "status", "real_tokens_per_s", "mfu_pct",
                                                 "peak_allocated_gib", "s_per_step", "real_tokens_per_step",
                                                 "wall_s", "stderr_tail")}), flush=True)
        _ratios(results)
        # Written after every configuration: a call cut short keeps what it measured.
        (out / "throughput.json").write_text(json.dumps({
            "command": " ".join(sys.argv), "cap_gib": a.cap, "model": MODEL, "rows": a.rows, "warmup": a.warmup,
            "steps": a.steps, "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
            "results": results}, indent=1, default=str))
    for r in results:
        print(f"{r['suite']:8s} {r['config']:15s} {r['status']:8s} tok/s {r.get('real_tokens_per_s') or 0:>9.0f}  "
              f"MFU {r.get('mfu_pct', 0):>5}%  peak {r.get('peak_allocated_gib')} GiB  "
              f"x naive {r.get('x_naive')}  x off-the-shelf {r.get('x_offshelf')}  peak/naive {r.get('peak_vs_naive')}")


def _ratios(results: list[dict]) -> None:
    """Each configuration against its suite's naive and off-the-shelf baselines (tokens/s; peak memory)."""
    for suite, (naive, offshelf) in BASELINE.items():
        by = {r["config"]: r for r in results if r["suite"] == suite}
        for r in by.values():
            for base, key in ((naive, "x_naive"), (offshelf, "x_offshelf")):
                if base and by.get(base, {}).get("real_tokens_per_s") and r.get("real_tokens_per_s"):
                    r[key] = round(r["real_tokens_per_s"] / by[base]["real_tokens_per_s"], 2)
            if by.get(naive, {}).get("peak_allocated_gib") and r.get("peak_allocated_gib"):
                r["peak_vs_naive"] = round(r["peak_allocated_gib"] / by[naive]["peak_allocated_gib"], 2)


if __name__ == "__main__":
    main()
