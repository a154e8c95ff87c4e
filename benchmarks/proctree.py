"""Running a benchmark's child process so that stopping it stops every process it started.

`accelerate launch` (torch elastic) starts its ranks in process groups of their own, so killing the launcher's
group leaves the ranks running: in session 2026-11-29d ranks left that way kept 41.7 GiB of a GPU and the host's
CPUs through the next two device calls. The runner makes itself a child subreaper (Linux), so a rank whose
launcher died is re-parented to the runner rather than to init, and stopping walks the runner's own
descendants: at a timeout, and when the runner itself gets SIGTERM. A SIGKILL of the runner cannot be caught:
gpu_calls.sh's `reap` is the backstop for that."""
from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
import sys
import threading
import time

import psutil

PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: orphans go to init, as before
        pass


def _descendants() -> list[psutil.Process]:
    alive = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _reap_zombies() -> None:
    while True:  # orphans re-parented to us are ours to wait for
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_all(first: int = signal.SIGKILL, grace: float = 15) -> None:
    """`first` to every descendant (SIGABRT: faulthandler prints each process's stacks), then SIGKILL to what
    is left after `grace` seconds, until none is left."""
    sig, deadline = first, time.time() + grace
    while procs := _descendants():
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=max(0.5, deadline - time.time()) if sig != signal.SIGKILL else 2)
        sig = signal.SIGKILL


def _on_sigterm(signum, frame) -> None:
    stop_all()
    sys.exit(128 + signum)


@functools.cache
def _install() -> None:
    """Once per runner, on its first run (not at import: the benchmark's own child processes import this too)."""
    _become_subreaper()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def run(cmd: list[str], timeout: float, first: int = signal.SIGKILL, grace: float = 15,
        **popen) -> tuple[int | None, str, str]:
    """(exit status, or None when `cmd` itself was still running at the timeout; stdout; stderr). Whatever it
    started is stopped before this returns, also when `cmd` exited and left processes holding its pipes."""
    _install()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    out = err = None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    timed_out = out is None and proc.poll() is None
    stop_all(first, grace)  # also what an exited `cmd` left behind
    if out is None:
        out, err = proc.communicate(timeout=30)
    _reap_zombies()
    return (None if timed_out else proc.returncode), out or "", err or ""
