"""The benchmark runners' process handling (benchmarks/proctree.py; benchmarks/ is not part of the package).
Each case runs in a driver process of its own: the runner makes itself a subreaper and takes SIGTERM, which
pytest's own process should not."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

# Launchers whose worker runs in a session of its own, as torch elastic's ranks do under accelerate launch.
WORKER = 'import signal, time; signal.signal(signal.SIGABRT, signal.SIG_IGN); time.sleep(120)'
LAUNCHERS = {
    # still running at the timeout
    "hangs": f"""
import subprocess, sys, time
w = subprocess.Popen([sys.executable, "-c", {WORKER!r}], start_new_session=True)
print(w.pid, flush=True)
time.sleep(120)
""",
    # exits at once; its orphaned worker holds the pipes (a launcher killed by the OOM killer)
    "exits": f"""
import os, subprocess, sys
w = subprocess.Popen([sys.executable, "-c", {WORKER!r}], start_new_session=True)
print(w.pid, flush=True)
os._exit(0)
""",
}
DRIVER = """
import json, signal, sys, time
sys.path.insert(0, sys.argv[1])
import proctree
t0 = time.time()
code, out, err = proctree.run([sys.executable, "-c", sys.argv[2]], timeout=float(sys.argv[3]),
                              first=getattr(signal, sys.argv[4]), grace=2)
print(json.dumps({"code": code, "worker": int(out.split()[0]), "seconds": time.time() - t0}))
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _drive(launcher: str, timeout: float, first: str) -> dict:
    p = subprocess.run([sys.executable, "-c", DRIVER, str(BENCH), LAUNCHERS[launcher], str(timeout), first],
                       capture_output=True, text=True, timeout=100)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.splitlines()[-1])


@pytest.mark.parametrize("first", ["SIGKILL", "SIGABRT"])
def test_a_timed_out_run_takes_its_detached_worker_with_it(first):
    """The worker ignores SIGABRT, so the SIGABRT case also needs the SIGKILL after the grace period (2 s here)."""
    r = _drive("hangs", 3, first)
    # A worker left alive would hold the pipes open until its own 120 s sleep ends.
    assert r["code"] is None and r["seconds"] < 30 and _gone(r["worker"])


def test_an_orphaned_worker_of_an_exited_launcher_is_stopped():
    r = _drive("exits", 3, "SIGKILL")
    assert r["code"] == 0 and r["seconds"] < 20 and _gone(r["worker"])


def test_sigterm_to_the_runner_stops_the_tree(tmp_path):
    runner = tmp_path / "runner.py"
    runner.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(BENCH)!r})
        import proctree
        proctree.run([sys.executable, "-c", {LAUNCHERS['hangs']!r}], timeout=60)
    """))
    proc = subprocess.Popen([sys.executable, str(runner)])
    deadline = time.time() + 20
    workers = []
    while time.time() < deadline and len(workers) < 2:
        workers = psutil.Process(proc.pid).children(recursive=True)
        time.sleep(0.1)
    assert len(workers) == 2  # the launcher and its detached worker
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    time.sleep(0.5)
    assert all(_gone(w.pid) for w in workers)


def test_a_run_that_finishes_returns_its_output():
    p = subprocess.run([sys.executable, "-c", f"""
import sys
sys.path.insert(0, {str(BENCH)!r})
import proctree
print(proctree.run([sys.executable, "-c", "import sys; print('hi'); sys.exit(3)"], timeout=30))
"""], capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "(3, 'hi\\n', '')"


def test_every_gpu_matrix_run_builds_a_valid_recipe():
    """The device calls cost GPU time: a matrix run whose recipe or overrides no longer validate fails here."""
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_matrix
    finally:
        sys.path.remove(str(BENCH))
    from samsum_tuner.recipe import build_recipe
    from samsum_tuner.errors import ConfigError

    root = BENCH.parent
    built = 0
    for name, (_, recipe, overrides, expect) in gpu_matrix.RUNS.items():
        args = [o.format(probe_cap="30", probe_cap_lo="29") for o in overrides if o != "--force"]
        try:
            build_recipe(root / recipe, args)
            built += 1
        except ConfigError as e:
            assert expect == "refused", f"{name}: {e}"
    assert built >= len(gpu_matrix.RUNS) - 2


def _bench_module(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCH))


def test_trace_gaps_counts_overlapping_kernels_once_and_finds_the_idle_stretches():
    trace_gaps = _bench_module("trace_gaps")
    kernels = [{"ts": 0, "dur": 10}, {"ts": 5, "dur": 10}, {"ts": 40, "dur": 5}, {"ts": 90, "dur": 20}]
    busy, gaps = trace_gaps.busy_and_gaps(kernels, t0=0, t1=100)
    assert busy == 15 + 5 + 10  # [0, 15), [40, 45), [90, 100): the last kernel is cut at the step's end
    assert gaps == [(25, 15), (45, 45)]


def test_trace_gaps_counts_a_threads_host_time_once_by_its_outermost_operators():
    trace_gaps = _bench_module("trace_gaps")
    host = [{"tid": 1, "ts": 0, "dur": 30, "name": "FSDP::pre_forward (model.layers.0)"},
            {"tid": 1, "ts": 5, "dur": 10, "name": "aten::copy_"},  # inside pre_forward: not counted again
            {"tid": 1, "ts": 40, "dur": 20, "name": "FSDP::pre_forward (model.layers.1)"},
            {"tid": 2, "ts": 50, "dur": 30, "name": "autograd::engine::evaluate_function: MmBackward0"},
            {"tid": 2, "ts": 120, "dur": 5, "name": "aten::mm"}]  # after the step
    threads = trace_gaps.top_level(host, t0=0, t1=100)
    assert threads == {1: (50, {"FSDP::pre_forward": 50}), 2: (30, {"backward of MmBackward0": 30})}


def test_repeated_benchmark_runs_compare_by_their_median_run():
    throughput = _bench_module("throughput")
    runs = [{"config": c, "suite": "fsdp", "real_tokens_per_s": t, "peak_allocated_gib": 10.0}
            for c, t in [("naive_fsdp_sgd", 100), ("ours_fsdp_sgd", 290), ("naive_fsdp_sgd", 80),
                         ("ours_fsdp_sgd", 310), ("naive_fsdp_sgd", 120), ("ours_fsdp_sgd", 200)]]
    throughput._ratios(runs)
    ours = [r for r in runs if r["config"] == "ours_fsdp_sgd"]
    assert [r["x_naive"] for r in ours] == [2.9, 3.1, 2.0]  # each against the naive median, 100
    assert [r["median_of_repeats"] for r in ours] == [True, False, False]
    assert ours[0]["repeat_tokens_per_s"] == [290, 310, 200]


def test_an_even_count_of_baseline_runs_compares_against_their_middle_twos_mean():
    throughput = _bench_module("throughput")
    runs = [{"config": c, "suite": "fsdp", "real_tokens_per_s": t, "peak_allocated_gib": 10.0}
            for c, t in [("naive_fsdp_sgd", 80), ("ours_fsdp_sgd", 300), ("naive_fsdp_sgd", 120),
                         ("ours_fsdp_sgd", 310)]]
    throughput._ratios(runs)
    # the lower naive run (80) alone would make ours 3.75x
    assert [r["x_naive"] for r in runs if r["config"] == "ours_fsdp_sgd"] == [3.0, 3.1]


def test_the_gpu_table_reads_matrix_records_only():
    """Every committed file that gpu_table.py reads holds matrix records; other result lines (an A/B's, a
    benchmark's) live under other names, or the table cannot be rebuilt."""
    gpu_table = _bench_module("gpu_table")
    read = [call for folder in gpu_table.RESULTS.iterdir() if folder.is_dir()
            for call in folder.glob(gpu_table.MATRIX_RECORDS)]
    assert read
    for call in read:
        for line in call.read_text().splitlines():
            assert "summary" in json.loads(line), call


@pytest.mark.parametrize("layout,workers", [("padded", 0), ("packed", 0), ("packed", 2)])
def test_the_benchmark_counts_the_real_tokens_of_its_timed_steps_on_the_host(layout, workers, tiny_model_dir):
    """A plain Trainer (nothing of samsum_tuner in its loop) whose tokens are the lengths of the samples each batch
    is made of: no pad of a padded batch, and every packed sample's EOS, which is SmolLM2's pad id too (a count of
    the ids that are not the pad id leaves it out). With loader processes the count travels with each batch."""
    import argparse

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorWithFlattening

    throughput = _bench_module("throughput")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos = tokenizer.eos_token_id
    assert eos == tokenizer.pad_token_id
    lengths = [5, 9, 14, 20]
    data = Dataset.from_list([{"input_ids": [7] * (n - 1) + [eos], "labels": [7] * (n - 1) + [eos]} for n in lengths])
    collator = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100) if layout == "packed" else None
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # A batch of 4 rows: every optimizer step is the whole data set, in some order.
    result = throughput._trainer_run(model, tokenizer, data, 4, argparse.Namespace(warmup=1, steps=3),
                                     collator=collator, dataloader_num_workers=workers)
    assert result["timed_steps"] == 3 and result["real_tokens_per_step"] == sum(lengths)
    assert result["real_tokens_per_s"] == pytest.approx(sum(lengths) / result["s_per_step"])
    # each timed step's own time (a slow step, such as a recompilation, shows there), adding up to the window
    assert len(result["step_ms"]) == 3 and min(result["step_ms"]) > 0
    assert sum(result["step_ms"]) == pytest.approx(3000 * result["s_per_step"], rel=0.05, abs=1)
    assert result["median_step_ms"] == sorted(result["step_ms"])[1]


def test_a_warm_up_run_is_compared_but_is_no_baseline():
    throughput = _bench_module("throughput")
    runs = [{"config": c, "suite": "7b", "real_tokens_per_s": t, "peak_allocated_gib": 10.0, **extra}
            for c, t, extra in [("naive_lora", 50, {"repeat": "warm-up"}), ("naive_lora", 100, {}),
                                ("ours_lora", 400, {})]]
    throughput._ratios(runs)
    assert [r["x_naive"] for r in runs] == [0.5, 1.0, 4.0]  # against the measured naive run alone
    assert "repeat_tokens_per_s" not in runs[1]


def test_the_gpu_table_plans_each_run_with_the_checkpointing_it_ran_with():
    """Runs recorded before FSDP checkpointed activations by default ran their FSDP steps without it (their recipes
    recorded false); a run since that leaves the setting unset is planned checkpointed under FSDP, as it ran."""
    from samsum_tuner.recipe import build_recipe

    gpu_table, gpu_matrix = _bench_module("gpu_table"), _bench_module("gpu_matrix")
    session = gpu_table.RESULTS / "2026-12-04b-h200"
    before = [json.loads(line) for line in (session / "call3.jsonl").read_text().splitlines()]
    recipes = [r["summary"]["recipe"] for r in before]
    assert all(gpu_table._checkpointing_as_ran(r, recipes) == ["model.gradient_checkpointing=false"] for r in before)
    no_recipe = {"summary": {}}
    assert gpu_table._checkpointing_as_ran(no_recipe, recipes) == ["model.gradient_checkpointing=false"]
    now = []
    for name in ("h200_full_sgd_fsdp1", "h200_full_sgd_fsdp1_no_ckpt"):
        _, recipe, overrides, _ = gpu_matrix.RUNS[name]
        now.append({"summary": {"recipe": build_recipe(BENCH.parent / recipe, overrides).to_dict()}})
    recipes = [r["summary"]["recipe"] for r in now]
    assert [gpu_table._checkpointing_as_ran(r, recipes) for r in now] == [[], ["model.gradient_checkpointing=false"]]
    assert gpu_table._checkpointing_as_ran(no_recipe, recipes) == []  # the session's runs disagree: as it resolves


def test_host_overhead_splits_a_steps_host_time_by_package(tiny_model_dir, real_samsum):
    """benchmarks/host_overhead.py: the own time of every profiled function, by package, adds up to the step; the
    warm-up steps (3 by default: compilation) are not profiled."""
    env = {**os.environ, "SAMSUM_DATA_DIR": str(real_samsum)}
    p = subprocess.run([sys.executable, str(BENCH / "host_overhead.py"), str(tiny_model_dir), "--steps", "6"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    own = result["own_ms_per_step"]
    assert result["steps"] == 3 and {"samsum_tuner", "transformers", "torch", "C++ operators and builtins"} <= set(own)
    assert 0.5 * result["ms_per_step"] <= sum(own.values()) <= 1.05 * result["ms_per_step"]
