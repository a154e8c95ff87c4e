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

# Why a run's outcome is what it is, where the figures alone do not say: by "session/run", or by run name
# for every session's run of that name.
NOTES = json.loads((RESULTS / "notes.json").read_text())


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
