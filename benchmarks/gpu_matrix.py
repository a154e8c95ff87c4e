"""Run a list of recipes on the GPU machine, each in its own process, and write one JSON per run.

    python benchmarks/gpu_matrix.py --out $OUT --only cap32_qlora_fp16,h100_lora_bf16 [--steps 12]

Each run is `python -m samsum_tuner.train` (or `accelerate launch ...`) with bounded steps on real
SAMSum tokens; its status comes from the exit code (0 ok, 2 refused, 3 out of memory / will not fit)
and its figures from the run's own run_summary.json and memory.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from proctree import run

ROOT = Path(__file__).resolve().parents[1]
PROBED: dict[str, str] = {"probe_cap": "0", "probe_cap_lo": "0"}  # figures measured by an earlier run of this call
R = "recipes/"
ACC = ["accelerate", "launch", "--num_processes", "1"]
FSDP1 = ACC + ["--config_file", "accelerate_configs/fsdp4.yaml"]
FSDP1_OFFLOAD = ACC + ["--config_file", "accelerate_configs/fsdp4_cpu_offload.yaml"]
NO_CKPT = "model.gradient_checkpointing=false"  # FSDP recipes checkpoint every decoder layer unless told not to
# Two processes, one per GPU (the nvidia-h200-x2 kind): the mission's command with --num_processes 2.
ACC2 = ["accelerate", "launch", "--num_processes", "2"]
FSDP2 = ACC2 + ["--config_file", "accelerate_configs/fsdp4.yaml"]
FSDP2_OFFLOAD = ACC2 + ["--config_file", "accelerate_configs/fsdp4_cpu_offload.yaml"]
M7, M13 = "model.name=random:llama2-7b", "model.name=random:llama2-13b"
RETRIES = [M7, "data.split_slice=[:16]", "train.max_steps=-1"]  # 3 whole epochs of 16 rows
CAP32 = "memory.gpu_limit_gib=32"
# An H200 capped to what an H100 80GB shows (79.2 GiB): the H100 verdicts on the machine that is lent.
CAP80 = "memory.gpu_limit_gib=79.2"
PARITY = ["data.split_slice=[:2000]", "data.eval_slice=[:200]", "train.num_train_epochs=1", "train.max_steps=-1",
          "train.per_device_train_batch_size=16", "data.max_tokens_per_batch=null", "data.pad_to_multiple_of=null",
          "model.attn_implementation=sdpa", "train.warmup_steps=10", "train.logging_steps=5",
          "train.eval_on_start=true", "model.compile=false"]  # eager, as measured: its padded shapes vary

# name: (launcher prefix or None, recipe, overrides, expect)
RUNS: dict[str, tuple[list[str] | None, str, list[str], str]] = {
    # The original's single-GPU verdicts on a GPU capped at 32 GiB (a V100-32GB).
    "cap32_qlora_4bit_fp16": (None, R + "qlora_4bit_fp16.yaml", [M7, CAP32], "ok"),
    "cap32_lora_fp16": (None, R + "lora_fp16.yaml", [M7, CAP32, "--force"], "oom"),
    "cap32_lora_fp32": (None, R + "lora_fp32.yaml", [M7, CAP32, "--force"], "oom"),
    "cap32_full_fp32": (None, R + "full_fp32.yaml", [M7, CAP32, "--force"], "oom"),
    "cap32_full_fp16": (None, R + "full_fp16.yaml", [M7, CAP32, "--force"], "oom"),
    "cap32_full_4bit": (None, R + "full_4bit.yaml", [M7, CAP32], "refused"),
    # One H100 80GB (on an H200: capped at CAP80 by the runner unless the name starts with h200_).
    "gpu_qlora_fp16": (None, R + "qlora_4bit_fp16.yaml", [M7], "ok"),
    "gpu_qlora_bf16": (None, R + "qlora_4bit_fp16.yaml", [M7, "train.fp16=false", "train.bf16=true"], "ok"),
    "gpu_lora_fp16": (None, R + "lora_fp16.yaml", [M7], "ok"),
    "gpu_lora_bf16": (None, R + "lora_fp16.yaml", [M7, "train.fp16=false", "train.bf16=true"], "ok"),
    "gpu_lora_fp32": (None, R + "lora_fp32.yaml", [M7], "ok"),
    "gpu_full_pure_bf16_sgd": (None, R + "full_fp32.yaml", [M7, "model.dtype=bfloat16", "train.optim=sgd"], "ok"),
    "gpu_full_pure_bf16_adamw": (None, R + "full_fp32.yaml", [M7, "model.dtype=bfloat16"], "ok"),
    # 13B in fp32 weights (52 GB) + bf16 autocast copies does not fit 80 GB: the planner refuses it;
    # bf16 weights (what the refusal suggests) do.
    "gpu_13b_lora_bf16_mixed": (None, R + "lora_fp16.yaml", [M13, "train.fp16=false", "train.bf16=true"], "oom"),
    "gpu_13b_lora_bf16": (None, R + "lora_fp16.yaml", [M13, "train.fp16=false", "model.dtype=bfloat16"], "ok"),
    "gpu_13b_qlora_bf16": (None, R + "qlora_4bit_fp16.yaml", [M13, "train.fp16=false", "train.bf16=true"], "ok"),
    # FSDP code paths with one process.
    "fsdp1_lora_fp16": (FSDP1, R + "fsdp_lora_fp16.yaml", [M7], "ok"),
    "fsdp1_qlora": (FSDP1, R + "fsdp_qlora.yaml", [M7], "ok"),
    # Offload moves 27 GB of fp32 weights across PCIe every micro-step: 3 steps are enough for its peaks.
    "fsdp1_offload_sgd_fp32": (FSDP1_OFFLOAD, R + "fsdp_full_offload_fp32.yaml",
                               [M7, "train.optim=sgd", "train.max_steps=3"], "ok"),
    # H200 only (141 GB).
    "h200_full_bf16_mixed_adamw": (None, R + "full_fp32.yaml", [M7, "train.bf16=true"], "ok"),
    # The mission's recipe as committed (every decoder layer checkpointed under FSDP, as the original), and as it ran
    # before FSDP checkpointed by default: the same call gives both peaks and step times on one card.
    "h200_full_sgd_fsdp1": (FSDP1, R + "full_sgd.yaml", [M7], "ok"),
    "h200_full_sgd_fsdp1_no_ckpt": (FSDP1, R + "full_sgd.yaml", [M7, NO_CKPT], "ok"),
    # The mission's recipe with the one override that moves it to the fast path, evaluation included (its
    # 2-GPU run of 2026-11-30b, under flex_attention, was stopped compiling its evaluation; fast_path uses sdpa).
    "h200_full_sgd_fast_fsdp1": (FSDP1, R + "full_sgd.yaml", [M7, "fast_path=true"], "ok"),
    # Malloc retries: 3 epochs of 16 rows, longest batch first in each; the probe measures the peaks, the
    # capped runs set their caps just under its first epoch's reserved peak ("{probe_cap}", 0.1 GiB lower
    # "{probe_cap_lo}"), so the cache must be flushed and retried.
    "retries_probe": (None, R + "lora_fp32.yaml", RETRIES, "ok"),
    "retries_capped": (None, R + "lora_fp32.yaml", RETRIES + ["memory.gpu_limit_gib={probe_cap}", "--force"], "ok"),
    "retries_capped_lo": (None, R + "lora_fp32.yaml", RETRIES + ["memory.gpu_limit_gib={probe_cap_lo}", "--force"],
                          "ok"),
    # FSDP LoRA against plain LoRA on the real SmolLM2: the same pretrained weights and LoRA init either way (a
    # random 7B's values depend on which process draws them and in what order).
    "fsdp1_lora_fp16_smollm2": (FSDP1, R + "fsdp_lora_fp16.yaml", ["model.name=smollm2-135m"], "ok"),
    "lora_fp16_smollm2": (None, R + "lora_fp16.yaml", ["model.name=smollm2-135m"], "ok"),
    # Two GPUs, FSDP2 full shard over 2 processes.
    "fsdp2_lora_fp16": (FSDP2, R + "fsdp_lora_fp16.yaml", [M7], "ok"),
    "fsdp2_qlora": (FSDP2, R + "fsdp_qlora.yaml", [M7], "ok"),
    "fsdp2_full_adamw_fp32": (FSDP2, R + "fsdp_full_adamw_fp32.yaml", [M7], "ok"),
    "fsdp2_full_adamw_fp16": (FSDP2, R + "fsdp_full_adamw_fp16.yaml", [M7], "ok"),
    "fsdp2_full_adamw_bf16": (FSDP2, R + "fsdp_full_adamw_fp16.yaml", [M7, "train.fp16=false", "train.bf16=true"],
                              "ok"),
    "fsdp2_full_sgd": (FSDP2, R + "full_sgd.yaml", [M7], "ok"),
    "fsdp2_full_sgd_fp16": (FSDP2, R + "fsdp_full_sgd_fp16.yaml", [M7], "ok"),
    # The mission's command with the one override that moves it to the fast path (its 4 samples per step packed
    # into one row): beside fsdp2_full_sgd in the same call.
    "fsdp2_full_sgd_fast": (FSDP2, R + "full_sgd.yaml", [M7, "fast_path=true"], "ok"),
    # Evaluation under offload moves every layer's weights to the GPU per batch (32 rows outlasted a 330 s limit
    # in session 2026-11-30): 4 rows.
    "fsdp2_offload_adamw_fp32": (FSDP2_OFFLOAD, R + "fsdp_full_offload_fp32.yaml",
                                 [M7, "train.max_steps=3", "data.eval_slice=[:4]"], "ok"),
    "fsdp2_13b_full_sgd": (FSDP2, R + "full_sgd.yaml", [M13], "ok"),
    "fsdp2_13b_offload_sgd_fp32": (FSDP2_OFFLOAD, R + "fsdp_full_offload_fp32.yaml",
                                   [M13, "train.optim=sgd", "train.max_steps=2", "data.eval_slice=[:4]"], "ok"),
    # The embedded SmolLM2 (real weights): one epoch of the whole train split, eval on the whole validation
    # split before and after. Runner overrides that bound steps are replaced by the ones here.
    # samsum_tuner's recipe for the embedded model, as committed (2 epochs of the whole train split, eval on
    # the whole validation split); its ROUGE comes from `samsum-tuner eval` on the saved model afterwards.
    "smollm2_gpu": (None, R + "smollm2_gpu.yaml", ["train.max_steps=-1", "train.save_model=true",
                                                   "data.eval_slice=null", "train.logging_steps=20"], "ok"),
    # Packed and padded training learn the same: one epoch of 2,000 train rows, 16 rows per step either way
    # (the Trainer's sampler, same seed), sdpa for both; eval_loss on 200 validation rows.
    "parity_padded": (None, R + "smollm2_gpu.yaml", PARITY + ["data.packing=false"], "ok"),
    "parity_packed": (None, R + "smollm2_gpu.yaml", PARITY + ["data.packing=true"], "ok"),
    "smollm2_epoch": (None, R + "demo_cpu.yaml", ["data.split_slice=null", "train.max_steps=-1",
                                                  "train.num_train_epochs=1", "train.bf16=true",
                                                  "train.per_device_train_batch_size=16",
                                                  "train.per_device_eval_batch_size=32", "train.learning_rate=2e-4",
                                                  "train.warmup_steps=20", "train.logging_steps=20",
                                                  "data.eval_slice=null", "train.eval_on_start=true"], "ok"),
}


def _is_h200() -> bool:
    # nvidia-smi, not torch: a CUDA context in this process would take memory from the runs it measures.
    try:
        return "H200" in subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                        capture_output=True, text=True).stdout
    except OSError:
        return False


def run_one(name: str, steps: int, slice_rows: int, timeout: int, out: Path, extra: list[str]) -> dict:
    prefix, recipe, overrides, expect = RUNS[name]
    overrides = [o.format(**PROBED) for o in overrides]
    run_dir = Path("/tmp/samsum_runs") / name
    cmd = (prefix + ["-m", "samsum_tuner.train"] if prefix else [sys.executable, "-m", "samsum_tuner.train"])
    # The whole train split with its longest batch first (the memory verdict needs SAMSum's long tail),
    # evaluation on the first `slice_rows` validation rows.
    cmd += [recipe, f"train.output_dir={run_dir}", "train.overwrite_output_dir=true", f"train.max_steps={steps}",
            "data.longest_first=true", f"data.eval_slice=[:{slice_rows}]", "train.save_strategy=no",
            "train.save_model=false", "train.logging_steps=1", "train.report_to=[]", "train.disable_tqdm=true",
            *([CAP80] if name.startswith("gpu_") and _is_h200() else []), *overrides, *extra]
    # A run that fails early must not be read from an earlier run's files (memory.jsonl is appended to).
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.time()
    # faulthandler: a run stopped at its timeout prints every thread's stack (SIGABRT) before it is killed, so
    # a hang says where it hung.
    code, stdout, stderr = run(cmd, timeout, signal.SIGABRT, cwd=ROOT, env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    code = -9 if code is None else code
    status = {0: "ok", 2: "refused", 3: "oom"}.get(code, f"failed({code})")
    summary = {}
    if (run_dir / "run_summary.json").is_file():
        summary = json.loads((run_dir / "run_summary.json").read_text())
    memory = []
    if (run_dir / "memory.jsonl").is_file():
        memory = [json.loads(x) for x in (run_dir / "memory.jsonl").read_text().splitlines() if x.strip()]
    history = []
    if (run_dir / "log_history.json").is_file():
        history = json.loads((run_dir / "log_history.json").read_text())
    record = {"name": name, "status": status, "expected": expect, "exit_code": code,
              "wall_s": round(time.time() - t0, 1), "command": " ".join(cmd),
              "summary": summary, "memory": memory, "log_history": history,
              "stdout_tail": stdout[-3000:], "stderr_tail": stderr[-3000:], "stacks_at_timeout": _stacks(stderr),
              # torch.compile recompilations (TORCH_LOGS=recompiles): each is seconds to minutes of a run
              "recompiles": [x[:400] for x in stderr.splitlines() if "Recompiling function" in x
                             or "triggered by the following guard failure" in x][:30]}
    # One JSONL for the whole call: the device tool brings back at most 8 files.
    with open(out / "results.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
    if name == "retries_probe" and status == "ok":
        # Just under the first epoch's reserved peak: that epoch fits only once the allocator has freed its cached
        # blocks and retried. Caps tried: allocated + 0.1 GiB, OOM at step 0 (block rounding); (allocated +
        # reserved) / 2 = 30.96 GiB, one retry, then OOM in epoch 2 (fragmentation it cannot free); the run's
        # overall reserved peak - 0.1 = 31.28 GiB, retries 0/2/0 (epoch 1's 31.26 fit under it).
        alloc = max(r["gpu_peak_allocated_gib"] for r in memory if r.get("gpu_peak_allocated_gib") is not None)
        first = next((r["gpu_peak_reserved_gib"] for r in memory if r.get("event") == "epoch" and r.get("epoch") == 1),
                     max(r["gpu_peak_reserved_gib"] for r in memory if r.get("gpu_peak_reserved_gib") is not None))
        PROBED["probe_cap"] = f"{max(alloc + 0.5, first - 0.1):.2f}"
        PROBED["probe_cap_lo"] = f"{max(alloc + 0.45, first - 0.2):.2f}"
    line = [x for x in (stderr + stdout).splitlines() if "samsum-tuner: error" in x or "samsum_tuner: done" in x]
    print(f"[{name}] {status} (expected {expect}) in {record['wall_s']} s: {line[-1][:300] if line else stderr[-400:]}",
          flush=True)
    return record


def _stacks(stderr: str) -> list[str]:
    """The Python frames faulthandler printed at a timeout, each process's threads, innermost frame first."""
    frames = []
    for block in stderr.split("Fatal Python error: Aborted")[1:]:
        block = block.split("Extension modules:")[0]
        frames += [x.strip()[:200] for x in block.splitlines()
                   if x.strip().startswith(("File ", "Thread ", "Current "))]
    return frames[:120]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_results"))
    p.add_argument("--only", default=",".join(RUNS))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rows", type=int, default=64, help="validation rows for eval_loss")
    p.add_argument("--timeout", type=int, default=300,
                   help="per run; an FSDP run of the fp32 7B builds it on the host first: "
                        "150 s was too short on an H200")
    p.add_argument("--deadline", type=float, default=0,
                   help="seconds from start after which no new run starts (a device call has a hard limit)")
    p.add_argument("extra", nargs="*", help="overrides added to every run")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    for name in a.only.split(","):
        left = a.deadline - (time.time() - start) if a.deadline else a.timeout
        if left < 30:
            print(f"[{name}] not started: the call's deadline is near", flush=True)
            continue
        run_one(name.strip(), a.steps, a.rows, int(min(a.timeout, left)), out, a.extra)


if __name__ == "__main__":
    main()
