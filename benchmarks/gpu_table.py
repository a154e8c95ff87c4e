"""Turn the GPU matrix's raw results (benchmarks/results/*/call<N>*.jsonl) into docs/gpu_results.{json,md}.

    python benchmarks/gpu_table.py            # all result folders, newest session last

Each row carries the exact command, the device, library versions and the memory planner's prediction for
the same recipe (computed here: the planner needs no GPU), so the table doubles as the planner's check.
"""
from __future__ import annotations

import ast
import json
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS, DOCS = ROOT / "benchmarks" / "results", ROOT / "docs"
MATRIX_RECORDS = "call[0-9]*.jsonl"  # gpu_matrix.py's output, one file per device call (or lane)
sys.path.insert(0, str(ROOT))

# Why a run's outcome is what it is, where the figures alone do not say.
NOTES = {
    "cap32_full_4bit": "refused before loading: a 4-bit model takes no gradient (the log's flat loss / "
                       "'No inf checks')",
    "cap32_lora_fp32": "log: OOM; here OOM at the first (longest) batch: 25.6 GiB of fp32 weights + activations",
    "cap32_lora_fp16": "log: OOM; fp16 autocast keeps half copies of the fp32 weights (+12.5 GiB)",
    "cap32_full_fp32": "log: OOM; fp32 weights + gradients alone are 51 GiB",
    "cap32_full_fp16": "log: OOM; as full fp32 plus autocast copies",
    "fsdp1_lora_fp16": "finished 12 steps and its eval (figures from its memory.jsonl), then hit the runner's "
                       "150 s limit: the fp32 7B is built on rank 0's host before FSDP moves it (slow on CPU)",
    "2026-11-29b-h200/fsdp1_lora_fp16": "not finished: started late in its device call (after the GPU tests) and "
                                        "stopped by the call's deadline while rank 0 still built the fp32 7B on "
                                        "the host",
    "gpu_13b_lora_bf16_mixed": "refused by the planner before loading: 52 GB of fp32 weights + bf16 autocast copies "
                               "+ activations > 79.2 GiB; it names bf16 weights, which gpu_13b_lora_bf16 runs",
    "retries_capped": "cap = probe's peak allocated + 0.1 GiB left no room for the allocator's block rounding: "
                      "OOM at step 0 instead of retries (the runner now caps between the probe's allocated and "
                      "reserved peaks)",
    "2026-11-29b-h200/smollm2_gpu": "stopped at 330 s by the runner: ~230 s went to the first 20 steps "
                                    "(flex_attention compilation under fp32 weights + bf16 autocast, not yet "
                                    "diagnosed), then ~80,000 tokens/s; eval_loss 2.23 (start) -> 1.545 after "
                                    "epoch 1 (and 1.546 after epoch 2 of the 3-epoch run of call 2, whose train "
                                    "loss fell to 0.88 in epoch 3: the recipe now trains 2 epochs)",
    "2026-12-06c-h200/smollm2_gpu": "as committed (compiled: model.compile auto): 2 epochs, first optimizer step "
                                    "35.5 s after launch on a fresh machine, 260,455 tokens/s over the run; "
                                    "eval_loss 1.505; test ROUGE-1/2/L 47.13/21.60/38.57, 99.76% at EOS",
    "2026-12-06f-h100/smollm2_gpu": "as committed since d0233b2 (compiled, fused AdamW): 2 epochs, first optimizer "
                                    "step 44.1 s after launch on a fresh machine, 180,604 tokens/s over the run "
                                    "(88 ms a step: the host sets the pace on this machine); eval_loss 1.505; test "
                                    "ROUGE-1/2/L 47.19/21.23/38.54, 99.88% at EOS",
    "2026-11-29b-h200/parity_padded": "stopped by its device call's deadline",
    "parity_padded": "the packed/padded pair: 2,000 train rows, 16 rows per step, one epoch, sdpa, bf16: eval_loss "
                     "1.6470 padded vs 1.6456 packed (0.09% apart), train_loss 1.8194 both (docs/parity.png)",
    "parity_packed": "see parity_padded; the planner misses this one (ratio 0.65). Likely cause, not verified: "
                     "sdpa over a packed row takes a block-diagonal mask, and the planner's activation model assumes "
                     "kernels that keep no scores",
    "2026-11-29c-h200x2/smollm2_gpu": "2 epochs of the whole train split, ~106,000 tokens/s; eval_loss 2.253 "
                                      "(start) -> 1.505; the start-of-run evaluation took 177 s: the first, cold "
                                      "compilation of flex_attention on the machine (later evaluations 0.6 s, "
                                      "the training graph 6.5 s); test ROUGE-1/2/L 47.08/21.40/38.55, 99.76% at EOS",
    "h200_full_bf16_mixed_adamw": "fits the H200 with 1 malloc retry at its limit (fp32 weights, gradients and "
                                  "AdamW states: 108 GB before activations); AdamW at lr 1e-4 on random weights "
                                  "raises the loss in 6 steps",
    "2026-11-29c-h200x2/fsdp1_offload_sgd_fp32": "completed 3 steps and its eval, then did not exit (fixed: the "
                                                 "CLI closes the process group). Host: planner 96.13 GiB with "
                                                 "pinned shards rounded to powers of two (79.38 before), measured "
                                                 "95.71. GPU: the fp32 gradients held unsharded on the GPU between "
                                                 "micro-batches (no_sync, 25.6 GiB) were the 13.0 vs 30.4 GiB miss; "
                                                 "with them the planner gives 38.6, taking the longest batch's "
                                                 "activations on top where the run's peak came with a shorter one",
    "2026-11-29c-h200x2/retries_capped": "cap (alloc + reserved) / 2 = 30.96 GiB: one malloc retry, then out of "
                                         "memory at step 4; the retries with a per-epoch count are shown by "
                                         "h200_full_bf16_mixed_adamw's single epoch only",
    "lora_fp16_smollm2": "stopped by the runner's 75 s limit during training: the plain LoRA curve for the "
                         "comparison comes from the same command on a CPU (docs/fsdp_lora_parity.md)",
    "fsdp1_lora_fp16_smollm2": "60 steps, eval_loss 1.805; did not exit after 'done' (fixed since); its loss curve "
                               "against plain LoRA in docs/fsdp_lora_parity.md",
    "2026-11-29c-h200x2/fsdp2_full_sgd": "the mission's command (full_sgd.yaml) on 2 GPUs, before "
                                         "fsdp.reduce_every_micro_batch: the Trainer's no_sync kept every layer's "
                                         "fp32 gradient unsharded over the 4 micro-batches (12.8 GiB per rank more "
                                         "than the shards). The planner without that term gave 53.0 GiB against "
                                         "61.0 (rank 1 58.1); with it (how this run was made) 65.8. The default "
                                         "now syncs every micro-batch",
    "fsdp2_qlora": "FSDP + QLoRA, the second rank on its own GPU: no 'Inconsistent compute_device and device_id'",
    "2026-11-29d-h200x2/fsdp2_full_adamw_bf16": "AdamW at lr 1e-4 on random weights raises the loss in 6 steps, as on "
                                                "one GPU (h200_full_bf16_mixed_adamw)",
    "2026-11-29d-h200x2/fsdp2_13b_full_sgd": "not a verdict: out of memory with 43.7 GiB of the 139.8 GiB card outside "
                                             "this run. The killed call 1's fsdp2_offload_adamw_fp32 outlived it (its "
                                             "ranks run in their own session) and held 41.7 GiB of a GPU (named by "
                                             "the 1-GPU benchmark's OOM in the next call: 'Process 1672 has "
                                             "41.70 GiB'). Planner: 102.3 GiB per rank, fits. The device calls now "
                                             "kill leftovers first",
    "2026-11-29d-h200x2/retries_probe": "3 epochs of the same 16 rows, uncapped: 0 retries; the capped run takes "
                                        "its reserved peak less 0.1 GiB as its cap",
    "2026-11-29d-h200x2/retries_capped": "cap 31.28 GiB: retries per epoch 0, 2, 0 (total 2): the count is per epoch, "
                                         "not cumulative (epoch 3 prints 0 while the total stays 2), but the first "
                                         "epoch had none (its reserved peak, 31.26, fit under the cap); the issue "
                                         "asks for retries in epoch 1: next cap just under 31.26",
    "2026-11-29e-h200x2/fsdp2_full_adamw_fp32": "not a verdict: stopped by its device call's deadline 69 s in, while "
                                                "rank 0 still drew the random weights",
    "2026-11-29e-h200x2/retries_probe": "3 epochs of the same 16 rows, uncapped: 0 retries; reserved peak 31.26 GiB in "
                                        "epoch 1, which sets the capped runs' caps",
    "2026-11-29e-h200x2/retries_capped": "cap 31.16 GiB (epoch 1's reserved peak less 0.1): retries per epoch 1, 2, 2, "
                                         "running total 1, 3, 5: retries from the first epoch on, each epoch's own "
                                         "count printed beside the total (the log's '~32 retries' was such a total)",
    "2026-11-29e-h200x2/retries_capped_lo": "cap 31.06 GiB: 1 malloc retry in epoch 1, then out of memory at step 4: "
                                            "0.1 GiB less is under what the run needs, so the allocator's retry no "
                                            "longer frees enough",
    "2026-11-29e-h200x2/fsdp2_offload_adamw_fp32": "stopped by the runner's 200 s limit after 2 optimizer steps of "
                                                   "~37 s (AdamW over 3.44B fp32 parameters per rank on the host's "
                                                   "CPUs): no epoch ended, so no memory record yet",
    "2026-11-29e-h200x2/fsdp2_13b_full_sgd": "13B, the mission's full_sgd.yaml (SGD fp32) on 2 GPUs: fits at 138 GiB "
                                             "reserved of 139.8 with 1 and 2 malloc retries on ranks 0 and 1, as the "
                                             "original's 7B did at 29 GB of a 32 GB V100 (~32 retries)",
    "2026-11-30-h200x2/fsdp2_full_sgd": "the mission's command (full_sgd.yaml) on 2 GPUs with the default "
                                        "fsdp.reduce_every_micro_batch (a reduce-scatter per micro-batch): 48.77 GiB "
                                        "per rank against 61.0 in session 2026-11-29c, which held every fp32 "
                                        "gradient unsharded over the 4 micro-batches",
    "2026-11-30-h200x2/fsdp2_offload_adamw_fp32": (
        "3 optimizer steps, ~73 s each after the first (AdamW over 3.44B fp32 parameters per rank on the host's "
        "CPUs; loss 11.64, 10.34, 12.85) and the epoch's memory record, then stopped by the runner's 330 s limit "
        "during the 32-row evaluation. Whole-node host peak 125.10 GiB (62.56 per rank) against the planner's "
        "124.25"),
    "2026-11-30-h200x2/fsdp2_full_adamw_fp16": "step 5's gradients overflowed (grad_norm inf): the fp16 scaler "
                                               "skipped that step and lowered its scale, the run went on; AdamW at "
                                               "lr 1e-4 on random weights raises the loss in 6 steps",
    "2026-11-30-h200x2/fsdp2_full_adamw_fp32": "AdamW at lr 1e-4 on random weights raises the loss in 6 steps, as "
                                               "in the bf16 run",
    "2026-11-30b-h200x2/fsdp2_13b_offload_sgd_fp32": (
        "13B, FSDP CPU offload, SGD fp32 on 2 GPUs (the issue's last matrix run): 2 optimizer steps (132 s to the "
        "first, 110 s the second, each moving 6.6B fp32 parameters per rank to and from the host and stepping "
        "them there) and a 4-row "
        "evaluation. Whole-node host peak 218.30 GiB (109.16 per rank) against the planner's 218.15"),
    "2026-11-30b-h200x2/fsdp2_full_sgd": "the mission's command (full_sgd.yaml) as committed, beside its fast_path "
                                         "run: 12 steps at 1.61 s",
    "2026-11-30b-h200x2/fsdp2_full_sgd_fast": (
        "full_sgd.yaml with fast_path=true, run when fast_path chose flex_attention on a GPU: 12 steps trained "
        "(45 s and 18 s for the first two, compiling; then 1.39 s a step over steps 3-12 against 1.58 s for the "
        "committed run's, at about the same tokens), then stopped by the runner's 200 s limit still compiling "
        "flex_attention for the 64-row evaluation (a new kernel at every new number of 128-token blocks). "
        "fast_path now uses sdpa. Its peak came at step 1 (inferred: the record holds the epoch's peak), where "
        "rank 0 held the 4 longest samples packed (4,055 tokens) and SGD had no momentum yet: the planner plans "
        "for that batch with the momentum (+12.81 GiB); without it, it gives 57.14 GiB allocated against 57.38. "
        "This run is why the planner no longer adds gradients to activations when a step has one micro-batch "
        "(it said 82.76 before)"),
    "2026-12-04b-h200/h200_full_sgd_fsdp1": "the mission's recipe as committed, beside its fast_path run in the same "
                                            "call",
    "h200_full_sgd_fast_fsdp1": (
        "full_sgd.yaml with fast_path=true (sdpa), evaluation included: 0.84 s a step against 1.28 for the committed "
        "recipe in the same call (1.48x its real tokens/s), at a lower peak, to the same eval_loss. The planner's "
        "1.20: it adds SGD's momentum buffers (25.1 GiB) to the worst batch's activations, which this 12-step run "
        "meets at step 1 (longest_first), before SGD has made its buffers; a later epoch's longest batch meets them"),
    "smollm2_epoch": "cut off at 39% of the epoch when the session's device time ran out (~9,500 tokens/s "
                     "at batch 16); the logged train loss went 1.85 (epoch 0.09) to 1.67 (epoch 0.39); no eval yet",
}


# Runs recorded before a recipe setting existed ran as its override says; the planner predicts them as they ran.
# (override, whether a run's recorded recipe predates it)
LEGACY = (("train.supervised_logits_only=false",  # every position's logits
           lambda rec: "supervised_logits_only" not in rec["train"]),
          ("fsdp.reduce_every_micro_batch=false",  # the sync skipped on all but the last micro-batch
           lambda rec: "reduce_every_micro_batch" not in rec["fsdp"]))


def _compile_as_ran(record: dict) -> list[str]:
    """model.compile as the run had it: recorded since the knob exists (auto compiled there: each run is on a GPU),
    uncompiled before it. The fast recipes now say auto, and a compiled layer saves less (the planner knows)."""
    own = record["summary"].get("recipe")
    value = own["model"].get("compile", False) if own else False
    return [f"model.compile={str(value).lower()}"]


def _checkpointing_as_ran(record: dict, recipes: list[dict]) -> list[str]:
    """model.gradient_checkpointing as the run resolved it: a recorded true or false is how it ran (before FSDP runs
    checkpointed by default every run recorded one, false unless set); unset (null) resolves today as it did then.
    A run that recorded no recipe ran as the other runs of its session did, where they agree."""
    own = record["summary"].get("recipe")
    values = {rec["model"].get("gradient_checkpointing") for rec in ([own] if own else recipes)}
    if len(values) == 1 and None not in values:
        return [f"model.gradient_checkpointing={str(values.pop()).lower()}"]
    return []


def _args(command: str) -> tuple[str | None, list[str]]:
    argv = shlex.split(command)
    rest = argv[argv.index("samsum_tuner.train") + 1:]
    path = rest[0] if rest and rest[0].endswith((".yaml", ".yml")) else None
    return path, [a for a in rest[1 if path else 0:] if a != "--force"]


def _predict(command: str, cache: dict, extra: list[str]) -> dict:
    """The planner's GPU peak for the run's own recipe and the real token lengths of its train split."""
    from samsum_tuner.planning import train_lengths
    from samsum_tuner.recipe import build_recipe
    from samsum_tuner.planner import plan

    from samsum_tuner.errors import ConfigError

    path, overrides = _args(command)
    overrides = extra + overrides
    try:
        recipe = build_recipe(str(ROOT / path) if path else None, overrides)
    except ConfigError:  # a recipe that validation refuses has no memory verdict
        return {"predicted_gpu_peak_gib": None, "planner": "refused by validation"}
    key = (recipe.model.name.startswith("random:"), json.dumps(recipe.data.__dict__, sort_keys=True, default=str))
    if key not in cache:
        cache[key] = train_lengths(recipe)
    lengths, supervised = cache[key]
    argv = shlex.split(command)
    gpus = int(argv[argv.index("--num_processes") + 1]) if "--num_processes" in argv else 1
    p = plan(recipe, gpus=gpus, gpu_memory_gib=recipe.memory.gpu_limit_gib, token_lengths=lengths,
             supervised_lengths=supervised)
    return {"predicted_gpu_peak_gib": round(p.gpu_peak_gib, 2),
            "predicted_allocated_gib": round(p.gpu_allocated_gib, 2),
            "predicted_host_peak_gib": round(p.host_peak_gib, 2),
            "planner": "fits" if p.fits is not False else "will not fit"}


def _losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"\{'loss': '([0-9.]+)'", stdout)]


def row(record: dict, device: str, versions: dict, session: str, cache: dict, extra: list[str]) -> dict:
    s, name = record["summary"], record["name"]
    every = [m for m in record["memory"] if m.get("event") == "epoch"]
    epochs = [m for m in every if m.get("rank") == 0]
    mem = dict(s.get("memory") or {})
    ranks = sorted({m.get("rank") for m in every})
    if epochs:  # per-epoch peaks and the first epoch's retries, from the callback's own file (the busiest rank)
        last = epochs[-1]
        for k in ("gpu_peak_allocated_gib", "gpu_peak_reserved_gib", "gpu_peak_active_gib", "host_peak_rss_gib"):
            mem[k] = max(e.get(k) or 0 for e in every)
        mem["gpu_malloc_retries_per_epoch"] = [e.get("gpu_malloc_retries") for e in epochs]
        mem["gpu_malloc_retries_total"] = last.get("gpu_malloc_retries_total")
    nodes = [m.get("host_peak_rss_node_gib") for m in record["memory"] if m.get("event") == "node"]
    per_rank = {r: max(e.get("gpu_peak_allocated_gib") or 0 for e in every if e.get("rank") == r) for r in ranks}
    m = s.get("metrics", {})
    status = record["status"]
    if status.startswith("failed(-9)"):
        # "done" printed and its summary written, then the process did not exit (an open NCCL process group, see
        # cli._close_process_group): the run itself completed.
        status = "ok, hung at exit" if "samsum_tuner: done" in record["stdout_tail"] and s else "cut off"
    out = {
        "run": name, "session": session, "device": device, "status": status, "expected": record["expected"],
        "s_per_step": m.get("s_per_step"), "real_tokens_per_s": m.get("real_tokens_per_s"),
        "gpu_peak_allocated_gib": mem.get("gpu_peak_allocated_gib"),
        "gpu_peak_reserved_gib": mem.get("gpu_peak_reserved_gib"),
        "gpu_peak_active_gib": mem.get("gpu_peak_active_gib"), "gpu_limit_gib": mem.get("gpu_limit_gib"),
        "gpu_malloc_retries_per_epoch": mem.get("gpu_malloc_retries_per_epoch"),
        "gpu_malloc_retries_total": mem.get("gpu_malloc_retries_total"),
        "host_peak_rss_gib": mem.get("host_peak_rss_gib"),
        "processes": len(ranks) or None,
        "per_rank_gpu_peak_allocated_gib": list(per_rank.values()) if len(ranks) > 1 else None,
        "host_peak_node_gib": max((n for n in nodes if n is not None), default=None),
        "first_loss": m.get("first_loss"), "last_loss": m.get("last_loss"), "eval_loss": m.get("eval_loss"),
        "eval_ppl": m.get("eval_ppl"), "logged_losses": _losses(record["stdout_tail"]),
        "error": s.get("error") or ([ln for ln in record["stderr_tail"].splitlines() if "samsum-tuner: error" in ln]
                                    or [None])[-1],
        "note": NOTES.get(f"{session}/{name}", NOTES.get(name)), "command": record["command"], "versions": versions,
    }
    out.update(_predict(record["command"], cache, extra))
    # Like for like: the planner's allocated figure (its peak less allocator fragmentation and the CUDA
    # context, which max_memory_allocated never counts) against the measured peak allocated.
    measured, predicted = out["gpu_peak_allocated_gib"], out.get("predicted_allocated_gib")
    if status in ("ok", "cut off", "ok, hung at exit") and measured and predicted:
        out["predicted_over_measured"] = round(predicted / measured, 3)
    if out["host_peak_node_gib"] and out.get("predicted_host_peak_gib"):
        out["host_predicted_over_measured"] = round(out["predicted_host_peak_gib"] / out["host_peak_node_gib"], 3)
    return out


def _fmt(v, nd=2) -> str:
    if v is None or v == []:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    if isinstance(v, list):
        return "/".join(str(x) for x in v)
    return str(v)


def markdown(rows: list[dict]) -> str:
    lines = ["# GPU results", "",
             "Generated by `python benchmarks/gpu_table.py` from the raw records in `benchmarks/results/` "
             "(each folder's `commands.md` gives the device calls). Runs: `random:llama2-7b` (Llama-2-7B shape, "
             "random init, SmolLM2 vocabulary) on real SAMSum tokens, the whole train split with its longest "
             "batch first, 12 optimizer steps, eval_loss on the first 64 validation rows; figures from the "
             "project's memory callback. `cap32_*` runs cap the GPU at 32 GiB (a V100-32GB), `gpu_*` at 79.2 GiB "
             "(an H100 80GB) on the H200. Session 2026-11-29b ran 6 steps with eval on 32 rows, two runs at a time on "
             "the one GPU after its benchmark (memory per process is unaffected; s/step and tokens/s there are "
             "shared-GPU figures). Session 2026-11-29c ran on two H200s: single-GPU runs on one GPU each, two "
             "lanes at once; `fsdp2_*` runs one process per GPU (GPU figures of the busiest rank, host figures of "
             "the node). In session 2026-11-29d the second and third calls ran beside a run left behind by the "
             "first (41.7 GiB of one GPU, the host CPUs busy): their memory verdicts say so in the notes, their "
             "s/step are not clean. *Planner* is the memory planner's GPU peak for the same recipe (real token "
             "lengths), *ratio* its allocated estimate (the peak less fragmentation and CUDA context) over the "
             "measured peak allocated.", ""]
    head = ["run", "status", "s/step", "real tok/s", "GPU alloc / reserved / active GiB", "retries (epoch/total)",
            "host peak GiB (planner)", "loss first→last", "eval_loss (ppl)", "planner peak / alloc GiB", "ratio",
            "note"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mem = (f"{_fmt(r['gpu_peak_allocated_gib'])} / {_fmt(r['gpu_peak_reserved_gib'])} / "
               f"{_fmt(r['gpu_peak_active_gib'])}")
        if r["gpu_limit_gib"]:
            mem += f" (cap {r['gpu_limit_gib']:g})"
        if r.get("per_rank_gpu_peak_allocated_gib"):
            mem += f"; alloc per rank {_fmt(r['per_rank_gpu_peak_allocated_gib'])}"
        host = _fmt(r.get("host_peak_node_gib") or r["host_peak_rss_gib"])
        if (r.get("processes") or 1) > 1:
            host += f" (node, {r['processes']} ranks)"
        if r.get("host_predicted_over_measured") and (r.get("host_peak_node_gib") or 0) > 10:
            host += f" ({_fmt(r['predicted_host_peak_gib'])}: x{r['host_predicted_over_measured']:.3f})"
        retries = f"{_fmt(r['gpu_malloc_retries_per_epoch'])} / {_fmt(r['gpu_malloc_retries_total'])}"
        loss = f"{_fmt(r['first_loss'], 3)}→{_fmt(r['last_loss'], 3)}" if r["first_loss"] is not None else "–"
        ev = f"{_fmt(r['eval_loss'], 3)} ({_fmt(r['eval_ppl'], 0)})" if r["eval_loss"] is not None else "–"
        status = r["status"] + ("" if r["status"] == r["expected"] else f" (expected {r['expected']})")
        note = r["note"] or (r["error"] or "")
        lines.append("| " + " | ".join([r["run"], status, _fmt(r["s_per_step"]), _fmt(r["real_tokens_per_s"], 0), mem,
                                        retries, host, loss, ev,
                                        f"{_fmt(r['predicted_gpu_peak_gib'])} / "
                                        f"{_fmt(r.get('predicted_allocated_gib'))} ({r['planner']})",
                                        _fmt(r.get("predicted_over_measured"), 3), note.replace("|", "/")]) + " |")
    sessions = sorted({(r["session"], r["device"], json.dumps(r["versions"], sort_keys=True)) for r in rows})
    lines += ["", "## Sessions", ""]
    for session, device, versions in sessions:
        lines.append(f"- {session}: {device}; {versions}")
    lines += ["", "Each run's exact command is in `docs/gpu_results.json` (`command`), run from the repository root "
              "by `benchmarks/gpu_matrix.py`.", ""]
    return "\n".join(lines)


def main() -> None:
    rows, cache = [], {}
    for folder in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        device = ((folder / "device.csv").read_text().splitlines()[1].strip()
                  if (folder / "device.csv").is_file() else "?")
        versions = (ast.literal_eval((folder / "versions.txt").read_text().strip())
                    if (folder / "versions.txt").is_file() else {})
        records = [json.loads(line) for call in sorted(folder.glob(MATRIX_RECORDS))
                   for line in call.read_text().splitlines()]
        recipes = [r["summary"]["recipe"] for r in records if r["summary"].get("recipe")]
        extra = [override for override, before in LEGACY if any(before(rec) for rec in recipes)]
        rows += [row(r, device, versions, folder.name, cache,
                     extra + _checkpointing_as_ran(r, recipes) + _compile_as_ran(r)) for r in records]
    DOCS.mkdir(exist_ok=True)
    (DOCS / "gpu_results.json").write_text(json.dumps(rows, indent=1) + "\n")
    (DOCS / "gpu_results.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
