"""die_with_parent: a child is SIGKILLed when its parent dies, and learns if the parent died first.

Real processes: a parent that starts a child and is then SIGKILLed."""

import os
import subprocess
import sys
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import sys, time
from dense_model.procutil import die_with_parent
print(die_with_parent(int(sys.argv[1])), flush=True)
time.sleep(float(sys.argv[2]))
"""
PARENT = """
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), "600"], stdout=sys.stdout)
print(child.pid, flush=True)
child.wait()
"""


def test_child_dies_with_its_parent():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD], stdout=subprocess.PIPE, text=True, env=env
    )
    child = psutil.Process(int(parent.stdout.readline()))
    assert parent.stdout.readline().strip() == "True"  # its parent is alive and is the one it named
    parent.kill()
    parent.wait()
    child.wait(timeout=10)  # raises psutil.TimeoutExpired if the child outlived its parent


def test_a_parent_that_died_first_is_reported():
    """The parent it was told about (1 here: not its parent) is gone: the caller must exit."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    orphan = subprocess.run(
        [sys.executable, "-c", CHILD, "1", "0"], capture_output=True, text=True, env=env, timeout=120
    )
    assert orphan.stdout.strip() == "False", orphan.stderr


def test_a_zombie_holds_no_claim(tmp_path):
    """A process that exited but was not reaped (its parent killed, no init reaping it in a container)
    still answers kill(pid, 0): the preprocessing claims and the run lock must see it as gone."""
    import socket
    import time

    from dense_model.data.preprocess import claims
    from dense_model.procutil import process_start_time
    from dense_model.training import run_lock

    child = subprocess.Popen([sys.executable, "-c", "pass"])  # not waited for: a zombie once it exits
    started = psutil.Process(child.pid).create_time()
    deadline = time.monotonic() + 60
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        os.kill(child.pid, 0)  # what a liveness test by signal sees: alive
        assert process_start_time(child.pid) is None
        assert process_start_time(os.getpid()) == psutil.Process().create_time()
        assert not claims.pid_alive(child.pid)
        record = {"host": socket.gethostname(), "pid": child.pid, "start": started, "job": None}
        assert claims.is_stale(record)
        holder = {"host": socket.gethostname(), "pid": child.pid, "pid_started": started}
        (tmp_path / "job.lock").write_text("{}")
        assert run_lock.stale_reason(holder, tmp_path / "job.lock") is not None
    finally:
        child.wait()


def test_kill_process_tree_leaves_no_child_forked_while_it_kills(tmp_path):
    """A parent forking as fast as it can (a checkpoint writer or data-loader worker started at the
    moment of the kill): every child it made is dead afterwards, none orphaned to init."""
    import subprocess
    import time as _time

    import psutil

    from dense_model.procutil import kill_process_tree

    marker = f"1000.{os.getpid()}{len(str(tmp_path))}"  # a sleep argument no other process has
    parent = subprocess.Popen(["bash", "-c", f"while :; do sleep {marker} & done"], start_new_session=True)
    _time.sleep(0.1)  # tens of children by now, more every millisecond
    kill_process_tree(parent.pid)
    parent.wait()
    _time.sleep(0.2)
    left = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    for proc in left:  # never leave them to the session-end check
        proc.kill()
    assert not left, f"{len(left)} children outlived kill_process_tree"
