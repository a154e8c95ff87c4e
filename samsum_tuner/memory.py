"""Memory figures like the original's MemoryTrace, made right.

Per epoch (and every N steps): peak GPU allocated / reserved / active, CUDA malloc retries *within*
the window (CUDA's counter is cumulative for the process), and peak host RSS from a background sampler
(a point-in-time RSS misses peaks), per rank and summed over the node's ranks (the original's host OOM
was all ranks together). GiB with two decimals; GPU fields are None on CPU, never zeros that pretend.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import TrainerCallback

GIB = 2**30


def _gib(n: float | None) -> float | None:
    return None if n is None else round(n / GIB, 2)


class HostPeakSampler:
    """This process's peak RSS over a window, sampled by a daemon thread."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self._proc = psutil.Process()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start_bytes = self._peak = self._rss()

    def _rss(self) -> int:
        return self._proc.memory_info().rss

    def _sample(self) -> None:
        rss = self._rss()
        with self._lock:
            self._peak = max(self._peak, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> "HostPeakSampler":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="host-rss-sampler", daemon=True)
            self._thread.start()
        return self

    def reset(self) -> None:
        rss = self._rss()
        with self._lock:
            self.start_bytes = self._peak = rss

    def peak_bytes(self) -> int:
        self._sample()
        with self._lock:
            return self._peak

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
            self._thread = None

    def __enter__(self) -> "HostPeakSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _cuda_stats() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {}
    return torch.cuda.memory_stats()


def snapshot(limit_gib: float | None = None) -> dict[str, Any]:
    """Peaks since the last reset (or process start), used at the end and when an OOM is caught."""
    rss = psutil.Process().memory_info().rss
    out: dict[str, Any] = {"host_rss_gib": _gib(rss)}
    if torch.cuda.is_available():
        s = torch.cuda.memory_stats()
        out.update(gpu_peak_allocated_gib=_gib(s.get("allocated_bytes.all.peak", 0)),
                   gpu_peak_reserved_gib=_gib(s.get("reserved_bytes.all.peak", 0)),
                   gpu_peak_active_gib=_gib(s.get("active_bytes.all.peak", 0)),
                   gpu_malloc_retries_total=s.get("num_alloc_retries", 0),
                   gpu_limit_gib=limit_gib)
    else:
        out.update(gpu_peak_allocated_gib=None, gpu_peak_reserved_gib=None, gpu_peak_active_gib=None,
                   gpu_malloc_retries_total=None, gpu_limit_gib=None)
    return out


def apply_gpu_limit(limit_gib: float | None) -> None:
    """Cap this process's CUDA caching allocator, e.g. at 32 GiB to reproduce a V100-32GB's verdicts."""
    if limit_gib is None:
        return
    if not torch.cuda.is_available():
        print("samsum_tuner: memory.gpu_limit_gib ignored: no CUDA on this machine", flush=True)
        return
    device = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit_gib * GIB / total), device)


def is_cuda_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "CUDA out of memory" in str(exc)


HUMAN_BLOCK = (
    "Max CUDA memory allocated was {a}\n"
    "Max CUDA memory reserved was {r}\n"
    "Peak active CUDA memory was {act}\n"
    "Cuda Malloc retires : {ret}\n"  # the original's spelling, so old log greps keep working
    "CPU Total Peak Memory consumed during the train (max): {host} GiB"
)


class MemoryCallback(TrainerCallback):
    """Per-epoch (and every `log_every_steps`) memory records: printed, logged, and in memory.jsonl."""

    def __init__(self, output_dir: str | None, log_every_steps: int = 0, sample_interval_s: float = 0.05,
                 gpu_limit_gib: float | None = None):
        self.output_dir = Path(output_dir) if output_dir else None
        self.log_every_steps = log_every_steps
        self.gpu_limit_gib = gpu_limit_gib
        self.sampler = HostPeakSampler(sample_interval_s)
        self.records: list[dict[str, Any]] = []
        self._pending: dict[str, float] = {}
        self._retries_base = 0
        self._epoch = 0

    # -- window handling
    def _reset_window(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self._retries_base = _cuda_stats().get("num_alloc_retries", 0)
        self.sampler.reset()

    def _record(self, event: str, state) -> dict[str, Any]:
        peak = self.sampler.peak_bytes()
        rec: dict[str, Any] = {"event": event, "epoch": self._epoch, "step": state.global_step,
                               "rank": int(os.environ.get("RANK", 0)), "world_size": int(os.environ.get("WORLD_SIZE", 1)),
                               "host": socket.gethostname(), "time": round(time.time(), 3)}
        s = _cuda_stats()
        if s:
            total = s.get("num_alloc_retries", 0)
            rec.update(gpu_peak_allocated_gib=_gib(s.get("allocated_bytes.all.peak", 0)),
                       gpu_peak_reserved_gib=_gib(s.get("reserved_bytes.all.peak", 0)),
                       gpu_peak_active_gib=_gib(s.get("active_bytes.all.peak", 0)),
                       gpu_malloc_retries=total - self._retries_base, gpu_malloc_retries_total=total,
                       gpu_limit_gib=self.gpu_limit_gib)
        else:
            rec.update(gpu_peak_allocated_gib=None, gpu_peak_reserved_gib=None, gpu_peak_active_gib=None,
                       gpu_malloc_retries=None, gpu_malloc_retries_total=None, gpu_limit_gib=None)
        rec.update(host_peak_rss_gib=_gib(peak), host_rss_start_gib=_gib(self.sampler.start_bytes),
                   host_peak_growth_gib=_gib(peak - self.sampler.start_bytes))
        return rec

    def _gather(self, rec: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's record (a collective: all ranks reach the same events), plus node sums."""
        import torch.distributed as dist

        records = [rec]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            records = [None] * dist.get_world_size()
            dist.all_gather_object(records, rec)
        for host in sorted({r["host"] for r in records}):
            same = [r for r in records if r["host"] == host]
            node = {"event": f"{rec['event']}_node", "epoch": rec["epoch"], "step": rec["step"], "host": host,
                    "ranks": [r["rank"] for r in same],
                    "host_peak_rss_node_gib": round(sum(r["host_peak_rss_gib"] for r in same), 2)}
            for r in same:
                r["host_peak_rss_node_gib"] = node["host_peak_rss_node_gib"]
            records.append(node)
        return records

    def _emit(self, event: str, state) -> None:
        records = self._gather(self._record(event, state))
        if not state.is_world_process_zero:
            return
        self.records += records
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "memory.jsonl", "a", encoding="utf-8") as fh:
                for r in records:
                    fh.write(json.dumps(r) + "\n")
        mine = records[0]
        self._pending = {f"memory/{k}": v for k, v in mine.items()
                         if k.startswith(("gpu_peak", "gpu_malloc_retries", "host_peak")) and v is not None}
        if event == "epoch":
            fmt = (lambda v: f"{v:.2f} GiB") if mine["gpu_peak_allocated_gib"] is not None else (lambda v: "n/a (no CUDA)")
            print(f"[memory] epoch {mine['epoch']}, step {mine['step']}, rank 0 of {mine['world_size']}:\n" +
                  HUMAN_BLOCK.format(a=fmt(mine["gpu_peak_allocated_gib"]), r=fmt(mine["gpu_peak_reserved_gib"]),
                                     act=fmt(mine["gpu_peak_active_gib"]),
                                     ret=mine["gpu_malloc_retries"] if mine["gpu_malloc_retries"] is not None else "n/a",
                                     host=f"{mine['host_peak_rss_gib']:.2f}") +
                  f"\nCPU peak of all {len(mine.get('ranks', [])) or mine['world_size']} rank(s) on this node: "
                  f"{mine['host_peak_rss_node_gib']:.2f} GiB", flush=True)

    # -- Trainer events
    def on_train_begin(self, args, state, control, **kwargs):
        self.sampler.start()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._epoch += 1
        self._reset_window()

    def on_step_end(self, args, state, control, **kwargs):
        if self.log_every_steps and state.global_step % self.log_every_steps == 0:
            self._emit("step", state)
            self._reset_window()

    def on_epoch_end(self, args, state, control, **kwargs):
        self._emit("epoch", state)

    def pop_pending(self) -> dict[str, float]:
        """Figures not yet logged; SamsumTrainer.log adds them to the next log line (and so to TensorBoard)."""
        pending, self._pending = self._pending, {}
        return pending

    def on_train_end(self, args, state, control, **kwargs):
        self.sampler.stop()
