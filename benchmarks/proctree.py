"""Running a benchmark's child process so that stopping it stops every process it started.

`accelerate launch` (torch elastic) starts its ranks in process groups of their own, so killing the launcher's
group leaves the ranks running: in session 2026-11-29d ranks left that way kept 41.7 GiB of a GPU and the host's
CPUs through the next two device calls. This walks the process tree instead, at a timeout and when the runner
itself is told to stop (SIGTERM from a device call's limit)."""
from __future__ import annotations

import signal
import subprocess
import sys

import psutil

_current: list[subprocess.Popen] = []


def _signal_tree(pid: int, sig: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    return procs


def _stop(proc: subprocess.Popen, first: int, grace: float = 15) -> tuple[str, str]:
    """`first` to the whole tree (SIGABRT: faulthandler prints each process's stacks), SIGKILL to whatever is
    left after `grace` seconds; the run's (stdout, stderr)."""
    procs = _signal_tree(proc.pid, first)
    if first != signal.SIGKILL:
        for p in psutil.wait_procs(procs, timeout=grace)[1]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    out, err = proc.communicate()
    return out or "", err or ""


def _on_sigterm(signum, frame) -> None:
    for proc in _current:
        _signal_tree(proc.pid, signal.SIGKILL)
    sys.exit(128 + signum)


def run(cmd: list[str], timeout: float, first: int = signal.SIGKILL, **popen) -> tuple[int | None, str, str]:
    """(exit status or None at the timeout, stdout, stderr) of `cmd`."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    _current.append(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        return None, *_stop(proc, first)
    finally:
        _current.remove(proc)
