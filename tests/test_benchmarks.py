"""The benchmark runners' process handling (benchmarks/ is not part of the package)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import proctree  # noqa: E402

# A launcher whose worker runs in a session of its own, as torch elastic's ranks do under accelerate launch.
LAUNCHER = textwrap.dedent("""
    import subprocess, sys, time
    w = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    print(w.pid, flush=True)
    time.sleep(120)
""")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("first", [signal.SIGKILL, signal.SIGABRT])
def test_a_timed_out_run_takes_its_detached_workers_with_it(first):
    t0 = time.time()
    code, out, _ = proctree.run([sys.executable, "-c", LAUNCHER], timeout=3, first=first)
    # A worker left alive would hold the pipes open until its own 120 s sleep ends.
    assert code is None and time.time() - t0 < 30
    worker = int(out.split()[0])
    deadline = time.time() + 5
    while not _gone(worker) and time.time() < deadline:
        time.sleep(0.1)
    assert _gone(worker), "the worker outlived its stopped launcher"


def test_sigterm_to_the_runner_stops_the_tree(tmp_path):
    runner = tmp_path / "runner.py"
    runner.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(proctree.__file__).parent)!r})
        import proctree
        proctree.run([sys.executable, "-c", {LAUNCHER!r}], timeout=60)
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
    code, out, err = proctree.run([sys.executable, "-c", "import sys; print('hi'); sys.exit(3)"], timeout=30)
    assert (code, out.strip(), err) == (3, "hi", "")
