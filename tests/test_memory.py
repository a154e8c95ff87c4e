"""Memory callback: fields and plausible numbers from a real Trainer run, a short host spike the sampler
catches, per-rank records and node sums over 2 gloo processes, the hand-off into the Trainer's logs."""
from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from transformers import TrainerCallback

from samsum_tuner.memory import GIB, HostPeakSampler, MemoryCallback, apply_gpu_limit, is_cuda_oom, snapshot

from .conftest import ROOT, torchrun_two

MB = 10**6
FIVE_LINES = ["Max CUDA memory allocated was n/a (no CUDA)", "Max CUDA memory reserved was n/a (no CUDA)",
              "Peak active CUDA memory was n/a (no CUDA)", "Cuda Malloc retires : n/a (no CUDA)",
              "CPU Total Peak Memory consumed during the train (max): "]
GPU_FIELDS = ["gpu_peak_allocated_gib", "gpu_peak_reserved_gib", "gpu_peak_active_gib", "gpu_malloc_retries",
              "gpu_malloc_retries_total", "gpu_limit_gib"]


def test_the_printed_block_gives_an_epochs_retries_beside_the_running_total():
    # The original printed a cumulative count that read as per-epoch; ours says which is which.
    record = {"epoch": 3, "step": 30, "rank": 0, "world_size": 1, "gpu_peak_allocated_gib": 20.5,
              "gpu_peak_reserved_gib": 22.0, "gpu_peak_active_gib": 21.0, "gpu_malloc_retries": 2,
              "gpu_malloc_retries_total": 5, "host_peak_rss_gib": 3.25, "host_peak_rss_node_gib": 3.5}
    block = MemoryCallback._human(record).splitlines()
    assert block[0] == "[memory] epoch 3, step 30, rank 0 of 1:"
    assert block[1:5] == ["Max CUDA memory allocated was 20.50 GiB", "Max CUDA memory reserved was 22.00 GiB",
                          "Peak active CUDA memory was 21.00 GiB",
                          "Cuda Malloc retires : 2 in this epoch, 5 since the start"]
    assert block[5:] == ["CPU Total Peak Memory consumed during the train (max): 3.25 GiB",
                         "CPU peak of all ranks on this node: 3.50 GiB"]


def _tiny_trainer(out: Path, callback: MemoryCallback, trainer_cls=None, extra_callbacks=(), **kw):
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    ids = torch.randint(0, 128, (16, 12)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[], num_train_epochs=2,
                             per_device_train_batch_size=4, logging_steps=1, save_strategy="no", disable_tqdm=True)
    cls = trainer_cls or Trainer
    return cls(model=model, args=args, train_dataset=data, callbacks=[*extra_callbacks, callback], **kw)


def _read(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "memory.jsonl").read_text().splitlines()]


class _Spy(TrainerCallback):
    """Placed *before* the memory callback, where TensorBoard sits (integrations precede user callbacks)."""

    def __init__(self):
        self.seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def test_trainer_run_writes_prints_and_logs_epoch_records(tmp_path, capsys):
    out = tmp_path / "run"
    cb, spy = MemoryCallback(str(out), sample_interval_s=0.01), _Spy()
    trainer = _tiny_trainer(out, cb, extra_callbacks=[spy])
    trainer.train()

    recs = _read(out)
    epochs = [r for r in recs if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and [r["step"] for r in epochs] == [4, 8]
    for r in epochs:
        assert r["rank"] == 0 and r["world_size"] == 1
        assert all(r[k] is None for k in GPU_FIELDS)  # no CUDA: null, never a 0 that pretends
        assert 0.05 < r["host_peak_rss_gib"] < 24
        assert r["host_peak_rss_gib"] >= r["host_rss_start_gib"] and r["host_peak_growth_gib"] >= 0
        assert r["host_peak_rss_node_gib"] == r["host_peak_rss_gib"]  # one rank on the node
        assert isinstance(r["time"], float)
    nodes = [r for r in recs if r["event"] == "node"]
    assert len(nodes) == 2 and all(n["rank"] is None and n["ranks"] == [0] for n in nodes)
    assert cb.records == recs

    printed = capsys.readouterr().out
    for line in FIVE_LINES:
        assert printed.count(line) == 2, line
    assert f"CPU Total Peak Memory consumed during the train (max): {epochs[1]['host_peak_rss_gib']:.2f} GiB" in printed

    # Into the Trainer's logs (plain Trainer: the on_log fallback): epoch 1 joins the step-5 line,
    # epoch 2 the final train-summary line. GPU figures are absent on CPU, not None.
    logged = [h for h in trainer.state.log_history if "memory/host_peak_rss_gib" in h]
    assert [h["step"] for h in logged] == [5, 8] and "train_runtime" in logged[-1]
    assert logged[-1]["memory/host_peak_rss_gib"] == epochs[1]["host_peak_rss_gib"]
    assert not any(k.startswith("memory/gpu") for h in trainer.state.log_history for k in h)
    # ...but a callback ahead of ours (where TensorBoard sits) never sees them: why SamsumTrainer pops them.
    assert not any("memory/host_peak_rss_gib" in logs for logs in spy.seen) and spy.seen


def test_samsum_trainer_hands_figures_to_every_callback_and_step_windows(tmp_path):
    from samsum_tuner.config import Recipe
    from samsum_tuner.resolve import batching_spec
    from samsum_tuner.trainer import SamsumTrainer

    out = tmp_path / "run"
    cb, spy = MemoryCallback(str(out), log_every_steps=2, sample_interval_s=0.01), _Spy()
    trainer = _tiny_trainer(out, cb, trainer_cls=SamsumTrainer, extra_callbacks=[spy], recipe_yaml=Recipe().to_yaml(),
                            batching=batching_spec(Recipe()), memory=cb)
    trainer.train()
    # SamsumTrainer.log pops the figures before the line is built: callbacks ahead of ours see them too.
    assert any("memory/host_peak_rss_gib" in logs for logs in spy.seen)
    assert any("memory/host_peak_rss_gib" in h for h in trainer.state.log_history)

    recs = [r for r in _read(out) if r["event"] != "node"]
    assert [(r["event"], r["step"]) for r in recs] == [("step", 2), ("step", 4), ("epoch", 4),
                                                       ("step", 6), ("step", 8), ("epoch", 8)]
    # Step reports reset the window; the epoch record still covers the whole epoch.
    for epoch_rec, steps in ((recs[2], recs[0:2]), (recs[5], recs[3:5])):
        assert epoch_rec["host_peak_rss_gib"] >= max(s["host_peak_rss_gib"] for s in steps)
        assert epoch_rec["host_rss_start_gib"] <= epoch_rec["host_peak_rss_gib"]


def test_sampler_catches_a_short_spike_that_point_in_time_rss_misses():
    with HostPeakSampler(interval_s=0.01) as sampler:
        time.sleep(0.05)
        sampler.reset()
        base = sampler.start_bytes
        spike = np.ones(300 * MB // 8)  # written, so resident: ~300 MB
        time.sleep(0.3)
        del spike  # large numpy buffers are mmapped: freed straight back to the OS
        time.sleep(0.05)
        after = psutil.Process().memory_info().rss
        peak = sampler.peak_bytes()
    assert peak - base > 200 * MB
    assert peak - after > 200 * MB  # what a point-in-time RSS read now would have missed
    sampler.reset()  # a fresh window is never empty: the reset itself is a sample
    assert sampler.peak_bytes() >= sampler.start_bytes > 0


def test_snapshot_and_oom_helpers_on_cpu():
    s = snapshot(limit_gib=32)
    assert s["gpu_peak_allocated_gib"] is None and s["gpu_limit_gib"] is None
    assert 0 < s["host_rss_gib"] <= s["host_peak_rss_gib"] < 24
    assert is_cuda_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    try:
        try:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")
        except RuntimeError as inner:
            raise ValueError("step failed") from inner
    except ValueError as wrapped:
        assert is_cuda_oom(wrapped)
    assert not is_cuda_oom(ValueError("shapes do not match"))


WORKER = textwrap.dedent("""
    import sys, numpy as np, torch.distributed as dist
    from transformers import TrainerControl, TrainerState
    from samsum_tuner.memory import MemoryCallback

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cb = MemoryCallback(sys.argv[1], sample_interval_s=0.01)
    state = TrainerState(is_world_process_zero=rank == 0, is_local_process_zero=rank == 0)
    cb.on_train_begin(None, state, TrainerControl())
    cb.on_epoch_begin(None, state, TrainerControl())
    ballast = np.ones((100 + 150 * rank) * 10**6 // 8)  # ranks peak differently: the sum is checkable
    state.global_step, state.epoch = 3, 1.0
    cb.on_epoch_end(None, state, TrainerControl())
    cb.on_train_end(None, state, TrainerControl())
    assert len(cb.records) == 3, cb.records  # every rank got both records and the node sum
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_two_gloo_ranks_gather_records_and_node_sum(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "dist"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    p = torchrun_two(script, out, env=env, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]

    recs = _read(out)  # written by rank 0 only
    ranks = sorted((r for r in recs if r["event"] == "epoch"), key=lambda r: r["rank"])
    (node,) = [r for r in recs if r["event"] == "node"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["epoch"] == 1 and r["step"] == 3 and r["gpu_peak_allocated_gib"] is None for r in ranks)
    assert ranks[1]["host_peak_rss_bytes"] - ranks[0]["host_peak_rss_bytes"] > 100 * MB
    assert node["ranks"] == [0, 1] and node["window"] == "epoch"
    assert node["host_peak_rss_node_bytes"] == ranks[0]["host_peak_rss_bytes"] + ranks[1]["host_peak_rss_bytes"]
    gib_sum = ranks[0]["host_peak_rss_gib"] + ranks[1]["host_peak_rss_gib"]
    assert node["host_peak_rss_node_gib"] == pytest.approx(gib_sum, abs=0.011)  # rounded once, from bytes
    assert all(r["host_peak_rss_node_gib"] == node["host_peak_rss_node_gib"] for r in ranks)
    assert p.stdout.count("Cuda Malloc retires : n/a (no CUDA)") == 1  # printed by rank 0 only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_peaks_per_window_retries_not_cumulative_and_capped_oom(tmp_path, capsys):
    from transformers import TrainerControl, TrainerState

    def alloc(mib: int) -> torch.Tensor:
        return torch.empty(mib * 2**20, dtype=torch.uint8, device="cuda")

    cb = MemoryCallback(str(tmp_path), gpu_limit_gib=1.0)
    state, control = TrainerState(is_world_process_zero=True), TrainerControl()

    def epoch(n: int, work) -> dict:
        cb.on_epoch_begin(None, state, control)
        work()
        state.global_step, state.epoch = n, float(n)
        cb.on_epoch_end(None, state, control)
        return [r for r in cb.records if r["event"] == "epoch"][-1]

    apply_gpu_limit(None)  # no cap left over from an earlier test in this process
    torch.cuda.empty_cache()
    del_before = alloc(2048)
    del del_before  # a peak before the window must not leak into it
    torch.cuda.empty_cache()
    try:
        e1 = epoch(1, lambda: alloc(256))
        apply_gpu_limit(1.0)

        def retry():  # a cached 600 MiB block cannot serve 700 MiB under a 1 GiB cap: free the cache, retry
            a = alloc(600)
            del a
            alloc(700)

        e2 = epoch(2, retry)
        e3 = epoch(3, lambda: alloc(16))
        with pytest.raises(torch.OutOfMemoryError) as oom:
            alloc(2048)
        assert is_cuda_oom(oom.value)
        snap = snapshot(1.0)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert 0.24 <= e1["gpu_peak_allocated_gib"] < 1.0 and e1["gpu_peak_reserved_gib"] >= e1["gpu_peak_allocated_gib"]
    assert e1["gpu_peak_active_gib"] >= e1["gpu_peak_allocated_gib"] and e1["gpu_limit_gib"] == 1.0
    assert e2["gpu_malloc_retries"] == 1 and e2["gpu_malloc_retries_total"] >= 1
    assert e3["gpu_malloc_retries"] == 0 and e3["gpu_malloc_retries_total"] == e2["gpu_malloc_retries_total"]
    assert 0.6 <= e2["gpu_peak_allocated_gib"] <= 1.0 and snap["gpu_limit_gib"] == 1.0
    assert snap["gpu_peak_allocated_gib"] is not None and snap["gpu_peak_allocated_gib"] * GIB < 2 * GIB
    printed = capsys.readouterr().out
    assert f"Cuda Malloc retires : 1 in this epoch, {e2['gpu_malloc_retries_total']} since the start" in printed
    # Other tests of this process may still hold tensors: the printed peak is the record's, two decimals.
    assert f"Max CUDA memory allocated was {e1['gpu_peak_allocated_gib']:.2f} GiB" in printed
