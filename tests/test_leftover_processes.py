"""No test leaves a process behind: run_tool's and spawn_workers' forked workers end what the job
started (a multiprocessing Manager, as dist_checkpointing's async writer spawns, and a plain child),
and the session-end check in tests/conftest.py fails a pytest run, plain or under xdist, that leaves a
child or an orphan alive, and kills it."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dense_model.procutil import process_start_time
from dense_model.testing import run_tool, spawn_workers

REPO = Path(__file__).resolve().parents[1]

# Starts a Manager (a spawned server process, never shut down) and a child that would sleep for ten
# minutes, prints their pids and exits without waiting for either.
TOOL = """
import multiprocessing, subprocess, sys
if __name__ == "__main__":
    manager = multiprocessing.get_context("spawn").Manager()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(manager._process.pid, child.pid)
"""


def _gone(pids, timeout=10):
    deadline = time.monotonic() + timeout
    while any(process_start_time(p) is not None for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if process_start_time(p) is not None]


@pytest.mark.slow
def test_run_tool_ends_what_the_tool_started(tmp_path):
    script = tmp_path / "tool.py"
    script.write_text(TOOL)
    result = run_tool(script, [], tmp_path)
    assert result.returncode == 0, result.stderr
    pids = [int(p) for p in result.stdout.split()]
    assert len(pids) == 2
    assert _gone(pids) == [], "left alive by run_tool's worker"


# Starts a child, writes its pid to the file named by its argument, then hangs.
HANGING_TOOL = """
import pathlib, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
pathlib.Path(sys.argv[1]).write_text(str(child.pid))
time.sleep(600)
"""


@pytest.mark.slow
def test_a_tool_past_its_timeout_is_killed_with_its_children(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(HANGING_TOOL)
    with pytest.raises(subprocess.TimeoutExpired):
        run_tool(script, [tmp_path / "pid"], tmp_path, timeout=5)
    assert _gone([int((tmp_path / "pid").read_text())]) == [], "the tool's child outlived its timeout"


def _rank_starts_a_child(rank, world_size, out):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    Path(out).write_text(str(child.pid))


@pytest.mark.slow
def test_spawn_workers_ends_what_a_rank_started(tmp_path):
    spawn_workers(_rank_starts_a_child, 1, str(tmp_path / "pid"))
    pid = int((tmp_path / "pid").read_text())
    assert _gone([pid]) == [], "left alive by a spawn_workers rank"


# An inner pytest session with the repo's hooks; its orphan check counts only command lines that
# name the inner session's folder, so it never takes the outer suite's processes for its own.
INNER_CONFTEST = """
import tests.conftest
from tests.conftest import *  # noqa: F401,F403 (the session-end check)

tests.conftest.leftover_names = lambda config: [str(config.rootpath)]
tests.conftest.LEFTOVER_GRACE_S = 1.0  # what is left here is left for good
"""
INNER_TESTS = """
import subprocess, sys

def test_leaves_a_child(tmp_path):
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "CHILD"])

def test_leaves_an_orphan():
    # sh exits at once: the python it started goes to pid 1 (or a subreaper), named by its argument.
    subprocess.run(["sh", "-c", sys.executable + " -c 'import time; time.sleep(600)' ORPHAN-" + __file__ + " &"])

def test_leaves_nothing():
    subprocess.run([sys.executable, "-c", "pass"], check=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("xdist", [[], ["-n", "1"]], ids=["plain", "xdist"])
def test_a_session_that_leaves_processes_fails_and_kills_them(tmp_path, xdist):
    (tmp_path / "conftest.py").write_text(INNER_CONFTEST)
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *xdist, "test_inner.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "3 passed" in out, out
    assert "2 process(es) the tests started were still alive at the end (killed now)" in out, out
    assert "CHILD" in out and f"ORPHAN-{tmp_path}" in out, out
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert left == [], f"not killed: {left}"
