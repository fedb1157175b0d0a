"""The run-directory claim: one holder at a time, stale claims taken over, live ones refused.

Claims of other jobs are written as those jobs write them (the same JSON), with real processes:
a live one (this test's own interpreter) and a dead one (a child that has exited)."""

import json
import socket
import subprocess
import sys
import time

import pytest

from dense_model.training.run_lock import (
    LOCK_NAME,
    STALE_AFTER_S,
    RunDirBusy,
    RunDirClaim,
    _start_time,
    check_free,
)


def write_claim(run_dir, pid, host=None, heartbeat=None):
    now = time.time()
    record = {
        "host": host or socket.gethostname(),
        "pid": pid,
        "pid_started": _start_time(pid),
        "job_id": "other-job",
        "started": now - 60,
        "heartbeat": now if heartbeat is None else heartbeat,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps(record))
    return record


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_second_claim_is_refused_with_holder_and_fix(tmp_path):
    claim = RunDirClaim.acquire(tmp_path)
    with pytest.raises(RunDirBusy) as err:
        RunDirClaim.acquire(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert f"run directory {tmp_path} is in use" in message
    assert f"host {socket.gethostname()}, pid {claim.record['pid']}, since " in message
    assert "pick another run_dir=" in message
    with pytest.raises(RunDirBusy):
        check_free(tmp_path)
    claim.release()
    assert not (tmp_path / LOCK_NAME).exists()
    check_free(tmp_path)  # free again
    RunDirClaim.acquire(tmp_path).release()


def test_claim_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    write_claim(tmp_path, dead_pid())
    check_free(tmp_path)
    claim = RunDirClaim.acquire(tmp_path)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["job_id"] == claim.record["job_id"]
    assert not list(tmp_path.glob(f"{LOCK_NAME}.stale.*"))
    claim.release()


def test_live_claim_from_another_host_blocks_until_its_heartbeat_is_old(tmp_path):
    write_claim(tmp_path, 1, host="node-that-is-not-us")
    with pytest.raises(RunDirBusy, match="host node-that-is-not-us, pid 1"):
        RunDirClaim.acquire(tmp_path)
    write_claim(tmp_path, 1, host="node-that-is-not-us", heartbeat=time.time() - STALE_AFTER_S - 5)
    RunDirClaim.acquire(tmp_path).release()


def test_claim_of_a_live_process_on_this_host_is_kept(tmp_path):
    import os

    write_claim(tmp_path, os.getppid())  # pytest's parent: alive, started when the claim says
    with pytest.raises(RunDirBusy):
        RunDirClaim.acquire(tmp_path)
