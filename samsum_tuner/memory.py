"""Memory figures like the original's MemoryTrace, made right.

Per epoch (and every N optimizer steps): peak GPU allocated / reserved / active, CUDA malloc retries *within*
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
NO_CUDA = "n/a (no CUDA)"
# The record fields that also go into the Trainer's logs (as "memory/<field>"); None values are left out.
LOGGED = ("gpu_peak_allocated_gib", "gpu_peak_reserved_gib", "gpu_peak_active_gib", "gpu_malloc_retries",
          "gpu_malloc_retries_total", "host_peak_rss_gib", "host_peak_growth_gib", "host_peak_rss_node_gib")


def _gib(n: float | None) -> float | None:
    return None if n is None else round(n / GIB, 2)


class HostPeakSampler:
    """This process's peak RSS over a window, sampled by a daemon thread every `interval_s`."""

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
            self._stop.clear()  # startable again after stop(): a second trainer.train() call
            self._thread = threading.Thread(target=self._run, name="host-rss-sampler", daemon=True)
            self._thread.start()
        return self

    def reset(self) -> None:
        """Start a new window; its first sample is now, so even an instant window is never empty."""
        rss = self._rss()
        with self._lock:
            self.start_bytes = self._peak = rss

    def peak_bytes(self) -> int:
        self._sample()  # and a sample at read time
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


def _gpu_raw(use_cuda: bool = True) -> dict[str, int] | None:
    """Peaks since the last reset_peak_memory_stats and the cumulative retries; None without CUDA."""
    if not (use_cuda and torch.cuda.is_available()):
        return None
    s = torch.cuda.memory_stats()  # {} before CUDA is first used: zeros are then the truth
    return {"alloc": s.get("allocated_bytes.all.peak", 0), "reserved": s.get("reserved_bytes.all.peak", 0),
            "active": s.get("active_bytes.all.peak", 0), "retries": s.get("num_alloc_retries", 0)}


# GPU memory outside this process's allocator beyond its CUDA context and NCCL's buffers (about a GiB): another
# process holds it.
SHARED_CARD_GIB = 4


def held_outside_gib() -> float | None:
    """GPU memory this process's allocator does not hold: the CUDA context, NCCL buffers, and other processes
    on the same card. After an out-of-memory error a large figure means the card was shared, not too small."""
    if not torch.cuda.is_available():
        return None
    try:
        free, total = torch.cuda.mem_get_info()
    except RuntimeError:  # a CUDA error after the OOM must not cost the run its summary
        return None
    return _gib(total - free - torch.cuda.memory_reserved())


def usable_gpu_gib(free: int, total: int, reserved: int, device: int) -> tuple[float, str | None]:
    """GiB of the card this run can have: all of it, unless other processes hold more than SHARED_CARD_GIB
    (then what is free, plus what this process already holds), with a line that says so. A run that shared its
    card with a forgotten one ran out of memory at its first step instead of being told before loading."""
    held = (total - free - reserved) / 2**30
    if held <= SHARED_CARD_GIB:
        return total / 2**30, None
    usable = (free + reserved) / 2**30
    return usable, (f"GPU {device}: {held:.1f} of its {total / 2**30:.1f} GiB are held by other processes; "
                    f"planning with the {usable:.1f} GiB this run can have")


def _lifetime_peak_rss() -> int | None:
    try:
        import resource  # Unix only; Linux reports KiB (VmHWM: the kernel's own peak, nothing missed)

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, OSError):
        return None


def snapshot(limit_gib: float | None = None) -> dict[str, Any]:
    """The figures now: GPU peaks since the last window reset (the epoch in progress under MemoryCallback,
    so after an OOM the peak reached) and host RSS now and at its lifetime peak."""
    g = _gpu_raw()
    return {"gpu_peak_allocated_gib": g and _gib(g["alloc"]), "gpu_peak_reserved_gib": g and _gib(g["reserved"]),
            "gpu_peak_active_gib": g and _gib(g["active"]), "gpu_malloc_retries_total": g and g["retries"],
            "gpu_limit_gib": limit_gib if g else None,
            "host_rss_gib": _gib(psutil.Process().memory_info().rss), "host_peak_rss_gib": _gib(_lifetime_peak_rss())}


def apply_gpu_limit(limit_gib: float | None) -> None:
    """Cap this process's CUDA caching allocator, e.g. at 32 GiB to reproduce a V100-32GB's verdicts.

    None lifts an earlier cap: the fraction is process-wide, and a second trainer built in the same
    notebook or test session must not inherit the first one's limit.
    """
    if not torch.cuda.is_available():
        if limit_gib is not None:
            print("samsum_tuner: memory.gpu_limit_gib ignored: no CUDA on this machine", flush=True)
        return
    device = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = 1.0 if limit_gib is None else min(1.0, limit_gib * GIB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)


def is_cuda_oom(exc: BaseException | None) -> bool:
    # Wrappers (accelerate, FSDP) may re-raise: look down the chain.
    while exc is not None:
        if isinstance(exc, torch.OutOfMemoryError) or "CUDA out of memory" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


HUMAN_BLOCK = (
    "Max CUDA memory allocated was {a}\n"
    "Max CUDA memory reserved was {r}\n"
    "Peak active CUDA memory was {act}\n"
    "Cuda Malloc retires : {ret}\n"  # the original's spelling, so old log greps keep working
    "CPU Total Peak Memory consumed during the train (max): {host} GiB"
)


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class MemoryCallback(TrainerCallback):
    """Per-epoch (and every `log_every_steps`) memory records: printed, in the Trainer logs, in memory.jsonl.

    Must sit in the callbacks of every rank: with torch.distributed initialized each event is a collective.
    """

    def __init__(self, output_dir: str | None, log_every_steps: int = 0, sample_interval_s: float = 0.05,
                 gpu_limit_gib: float | None = None):
        self.output_dir = Path(output_dir) if output_dir else None
        self.log_every_steps = log_every_steps
        self.gpu_limit_gib = gpu_limit_gib
        self.sampler = HostPeakSampler(sample_interval_s)
        self.records: list[dict[str, Any]] = []  # every rank's records and node sums (all ranks get them)
        self._pending: dict[str, float] = {}
        self._epoch = 1
        # CUDA has one peak counter and the sampler one window; step reports reset both, so the epoch's
        # peaks are folded here as maxima over its step windows.
        self._epoch_max: dict[str, int] = {}
        self._epoch_base: dict[str, int] = {}
        self._window_retries = 0
        self._cuda = torch.cuda.is_available()  # narrowed to the Trainer's device once args are seen

    # -- windows
    def _reset_window(self) -> None:
        g = _gpu_raw(self._cuda)
        if g is not None:
            torch.cuda.reset_peak_memory_stats()
            self._window_retries = g["retries"]
        self.sampler.reset()

    def _measure(self) -> dict[str, int]:
        m = {"host_peak": self.sampler.peak_bytes(), "host_start": self.sampler.start_bytes}
        g = _gpu_raw(self._cuda)
        return m if g is None else {**m, **g}

    def _record(self, event: str, state, m: dict[str, int], retries_base: int) -> dict[str, Any]:
        rank, world = _rank_world()
        gpu = "alloc" in m
        return {"event": event, "epoch": self._epoch, "step": state.global_step, "rank": rank, "world_size": world,
                "host": socket.gethostname(),
                "gpu_peak_allocated_gib": _gib(m["alloc"]) if gpu else None,
                "gpu_peak_reserved_gib": _gib(m["reserved"]) if gpu else None,
                "gpu_peak_active_gib": _gib(m["active"]) if gpu else None,
                "gpu_malloc_retries": m["retries"] - retries_base if gpu else None,
                "gpu_malloc_retries_total": m["retries"] if gpu else None,
                "gpu_limit_gib": self.gpu_limit_gib if gpu else None,
                "host_peak_rss_gib": _gib(m["host_peak"]), "host_peak_rss_bytes": m["host_peak"],
                "host_rss_start_gib": _gib(m["host_start"]),
                "host_peak_growth_gib": _gib(m["host_peak"] - m["host_start"]),
                "time": round(time.time(), 3)}

    # -- ranks
    @staticmethod
    def _gather(rec: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's record plus one "node" record per hostname (all ranks reach the same events)."""
        import torch.distributed as dist

        records = [rec]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            records = [None] * dist.get_world_size()
            dist.all_gather_object(records, rec)  # gloo on CPU, nccl on GPU alike
        nodes = []
        for host in sorted({r["host"] for r in records}):
            same = [r for r in records if r["host"] == host]
            total = sum(r["host_peak_rss_bytes"] for r in same)  # exact bytes, rounded once
            for r in same:
                r["host_peak_rss_node_gib"] = _gib(total)
            # rank None: readers that pick "rank 0" records never take a node sum for one.
            nodes.append({"event": "node", "window": rec["event"], "epoch": rec["epoch"], "step": rec["step"],
                          "rank": None, "host": host, "ranks": [r["rank"] for r in same],
                          "world_size": rec["world_size"], "host_peak_rss_node_gib": _gib(total),
                          "host_peak_rss_node_bytes": total, "time": rec["time"]})
        return records + nodes

    def _emit(self, rec: dict[str, Any], state) -> None:
        records = self._gather(rec)  # a collective: before any rank-0-only branch
        self.records += records
        if not state.is_world_process_zero:
            return
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "memory.jsonl", "a", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in records)
        mine = next(r for r in records if r["rank"] == rec["rank"])
        self._pending = {f"memory/{k}": mine[k] for k in LOGGED if mine.get(k) is not None}
        if rec["event"] == "epoch":
            print(self._human(mine), flush=True)

    @staticmethod
    def _human(r: dict[str, Any]) -> str:
        gpu = (lambda k: NO_CUDA) if r["gpu_peak_allocated_gib"] is None else (lambda k: f"{r[k]:.2f} GiB")
        block = HUMAN_BLOCK.format(a=gpu("gpu_peak_allocated_gib"), r=gpu("gpu_peak_reserved_gib"),
                                   act=gpu("gpu_peak_active_gib"),
                                   ret=NO_CUDA if r["gpu_malloc_retries"] is None else
                                   f"{r['gpu_malloc_retries']} in this epoch, "
                                   f"{r['gpu_malloc_retries_total']} since the start",
                                   host=f"{r['host_peak_rss_gib']:.2f}")
        return (f"[memory] epoch {r['epoch']}, step {r['step']}, rank {r['rank']} of {r['world_size']}:\n{block}\n"
                f"CPU peak of all ranks on this node: {r['host_peak_rss_node_gib']:.2f} GiB")

    # -- Trainer events
    def on_train_begin(self, args, state, control, **kwargs):
        self.sampler.start()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler.start()  # idempotent; lets the callback be driven without on_train_begin
        if args is not None:  # use_cpu=True on a GPU machine: the GPU takes no part, so None, not zeros
            self._cuda = torch.cuda.is_available() and args.device.type == "cuda"
        # 1-based from the Trainer's own state, so a resumed run numbers its epochs right.
        self._epoch = int((state.epoch or 0) + 1e-6) + 1
        self._reset_window()
        self._epoch_max = {}
        self._epoch_base = {"retries": self._window_retries, "host_start": self.sampler.start_bytes}

    def on_step_end(self, args, state, control, **kwargs):
        if not self.log_every_steps or state.global_step % self.log_every_steps:
            return
        m = self._measure()
        self._emit(self._record("step", state, m, self._window_retries), state)
        for k in ("alloc", "reserved", "active", "host_peak"):
            if k in m:
                self._epoch_max[k] = max(self._epoch_max.get(k, 0), m[k])
        self._reset_window()

    def on_epoch_end(self, args, state, control, **kwargs):
        m = self._measure()
        for k, v in self._epoch_max.items():
            m[k] = max(m[k], v)
        m["host_start"] = self._epoch_base.get("host_start", m["host_start"])
        self._emit(self._record("epoch", state, m, self._epoch_base.get("retries", 0)), state)

    def on_train_end(self, args, state, control, **kwargs):
        self.sampler.stop()

    # -- into the Trainer's logs
    # `Trainer.log` appends a *copy* of `logs` to `state.log_history` and only then calls `on_log`, and the
    # integration callbacks (TensorBoard, W&B, ...) come before user callbacks in the handler's list (only
    # Progress/PrinterCallback is added after us). So mutating `logs` in on_log is seen by neither
    # log_history nor TensorBoard. The clean way in is before the line is built: SamsumTrainer.log calls
    # pop_pending() and every consumer sees one line. With a plain Trainer, on_log is the fallback: the
    # figures are added to the log_history entry just appended (and reach the progress printer), not to
    # TensorBoard. Either way they join the next log line after the window closes (the final train-summary
    # line for the last epoch); we do not force an extra log line, which would change the loss cadence.
    # memory.jsonl keeps every record with its exact step.
    def pop_pending(self) -> dict[str, float]:
        pending, self._pending = self._pending, {}
        return pending

    def on_log(self, args, state, control, logs=None, **kwargs):
        pending = self.pop_pending()
        if pending and logs is not None:
            logs.update(pending)
            if state.log_history:
                state.log_history[-1].update(pending)
