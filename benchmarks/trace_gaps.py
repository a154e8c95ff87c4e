"""Where a profiled step's GPU waits, from a chrome trace of `throughput.py --profile CONFIG --trace`.

    python benchmarks/trace_gaps.py trace_ours_fsdp_sgd_compiled.json.gz [--gaps 8]

Per profiled step: its length on the host, the time some kernel or copy ran on the GPU (their union), the
host's waits for the GPU (synchronisations, with the operator that asked for each) and the longest stretches
with nothing on the GPU, each with the host operators under way at the time: a host that cannot queue work
fast enough shows as many short gaps inside the layers' hooks, a host sync as one wait and a gap after it.
Then, per host thread (the forward's and the autograd engine's), how long it was busy and its costliest
top-level operators: which of the two sets the pace once the GPU waits for the host.
The profiler slows the host: compare shares between traces, not these lengths with unprofiled step times.
"""
from __future__ import annotations

import argparse
import gzip
import json

GPU = ("kernel", "gpu_memcpy", "gpu_memset")
HOST = ("cpu_op", "user_annotation", "python_function")


def load(path: str) -> list[dict]:
    with (gzip.open(path) if path.endswith(".gz") else open(path, "rb")) as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def busy_and_gaps(kernels: list[dict], t0: float, t1: float) -> tuple[float, list[tuple[float, float]]]:
    """Union of the GPU's activity within [t0, t1] and the gaps between, as (length, start) in microseconds."""
    busy, gaps, start, end = 0.0, [], None, None
    for k in kernels:
        a, b = max(k["ts"], t0), min(k["ts"] + k["dur"], t1)
        if b <= a:
            continue
        if end is None or a > end:
            if end is not None:
                busy += end - start
                gaps.append((a - end, end))
            start, end = a, b
        else:
            end = max(end, b)
    if end is not None:
        busy += end - start
    return busy, gaps


def top_level(host: list[dict], t0: float, t1: float) -> dict[int, tuple[float, dict[str, float]]]:
    """Per thread: its busy time within [t0, t1] (outermost operators only, so nothing counts twice) and that
    time by operator name, in microseconds."""
    threads: dict[int, tuple[float, dict[str, float]]] = {}
    for tid in sorted({h["tid"] for h in host if t0 <= h["ts"] < t1}):
        busy, names, end = 0.0, {}, None
        ops = sorted((h for h in host if h["tid"] == tid and t0 <= h["ts"] < t1), key=lambda h: (h["ts"], -h["dur"]))
        for h in ops:
            if end is None or h["ts"] >= end:
                name = h["name"].split(" (")[0].replace("autograd::engine::evaluate_function: ", "backward of ")
                names[name] = names.get(name, 0.0) + h["dur"]
                busy += h["dur"]
                end = h["ts"] + h["dur"]
        threads[tid] = (busy, names)
    return threads


def report(events: list[dict], top: int) -> list[str]:
    steps = sorted((e for e in events if e["name"].startswith("ProfilerStep#") and e.get("cat") == "user_annotation"),
                   key=lambda e: e["ts"])
    kernels = sorted((e for e in events if e.get("cat") in GPU), key=lambda e: e["ts"])
    host = [e for e in events if e.get("cat") in HOST and not e["name"].startswith("ProfilerStep#")]
    syncs = [e for e in events if e.get("cat") == "cuda_runtime" and "ynchronize" in e["name"]]
    out = []
    for s in steps:
        t0, t1 = s["ts"], s["ts"] + s["dur"]
        busy, gaps = busy_and_gaps(kernels, t0, t1)
        long_gaps = [g for g, _ in gaps if g > 100]
        out.append(f"{s['name']}: {s['dur'] / 1e3:.1f} ms on the host, GPU busy {busy / 1e3:.1f} ms, idle "
                   f"{(s['dur'] - busy) / 1e3:.1f} ms ({sum(long_gaps) / 1e3:.1f} ms of it in {len(long_gaps)} gaps "
                   "over 0.1 ms)")
        for w in (w for w in syncs if t0 <= w["ts"] <= t1):
            asked = [h["name"] for h in host
                     if h.get("tid") == w.get("tid") and h["ts"] <= w["ts"] <= h["ts"] + h["dur"]]
            out.append(f"  host waits {w['dur'] / 1e3:6.2f} ms at +{(w['ts'] - t0) / 1e3:6.1f} ms ({w['name']}) "
                       f"for {asked[-1] if asked else '?'}")
        for length, at in sorted(gaps, reverse=True)[:top]:
            mid = at + length / 2
            under_way = sorted((h for h in host if h["ts"] <= mid <= h["ts"] + h["dur"]), key=lambda h: h["dur"])
            out.append(f"  GPU idle {length / 1e3:6.2f} ms at +{(at - t0) / 1e3:6.1f} ms; host in: "
                       + " < ".join(h["name"][:50] for h in under_way[:3]))
        for tid, (busy, names) in top_level(host, t0, t1).items():
            costliest = sorted(names.items(), key=lambda kv: -kv[1])[:4]
            out.append(f"  host thread {tid} busy {busy / 1e3:6.1f} ms: "
                       + ", ".join(f"{n[:45]} {d / 1e3:.1f}" for n, d in costliest))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace")
    p.add_argument("--gaps", type=int, default=8, help="longest GPU gaps listed per step")
    a = p.parse_args()
    print("\n".join(report(load(a.trace), a.gaps)))


if __name__ == "__main__":
    main()
