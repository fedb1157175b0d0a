"""Who holds a preprocessing claim or the work folder's lock, judged from here: claims of other
hosts, containers and SLURM jobs written as those processes write them (the same JSON), real
processes for live and dead pids, real lock files read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from dense_model import procutil
from dense_model.data.preprocess import claims
from dense_model.data.preprocess.claims import ClaimError, is_stale, owner, take
from dense_model.data.preprocess.workdir import locked


@pytest.fixture
def slurm(monkeypatch):
    """No SLURM job by default; ``slurm(job, restart)`` makes this process one."""
    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)

    def set_job(job, restart=0):
        monkeypatch.setenv("SLURM_JOB_ID", job)
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart))

    return set_job


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def elsewhere(**fields) -> dict:
    """A live claim of a process on another host, as this version writes it."""
    return {**owner("task 0 of 2"), "host": "node-that-is-not-us", "pid": 4242, **fields}


def old_format(record: dict) -> dict:
    """The same claim as the previous version wrote it (no boot id, pid namespace or SLURM fields)."""
    keys = ("what", "host", "pid", "start", "job", "since")
    return {k: record[k] for k in keys}


def test_claims_of_other_hosts_outside_slurm_are_live(tmp_path, slurm):
    """Two instances on two hosts with no SLURM job: neither may take the other's claim (no job on
    either side is no "same job"), in this version's records and the previous version's."""
    path = str(tmp_path / "task.0.claim")
    for record in (elsewhere(), old_format(elsewhere())):
        assert record["job"] is None
        assert not is_stale(record)
        (tmp_path / "task.0.claim").write_text(json.dumps(record))
        assert not take(path, "task 0 of 2")
        assert claims.read_claim(path) == record


def test_a_requeue_is_stale_and_a_task_of_the_same_run_is_not(slurm):
    """On another host: the same SLURM job with a lower restart count was ended by SLURM (requeue);
    the same job and restart count is another task of that run (srun's tasks, a second step): live.
    A claim of the previous version naming this job and array task counts as a requeue, as it did."""
    slurm("77", restart=0)
    sibling = elsewhere()
    assert (sibling["slurm_job"], sibling["slurm_restart"]) == ("77", 0)
    assert not is_stale(sibling)
    slurm("77", restart=1)
    assert is_stale(sibling)
    assert not is_stale(elsewhere(slurm_job="78"))
    assert is_stale(old_format(sibling))  # its `job` is "77_": this job
    assert not is_stale(old_format(elsewhere(job="78_")))


def test_a_claim_from_another_pid_namespace_is_live_though_its_pid_is_dead_here(tmp_path):
    """Same hostname, another container (pid namespace) or boot: the pid is not judged here. A claim
    of the previous version (no such fields) is judged by its pid, as it was."""
    pid = dead_pid()
    mine = owner("task 0 of 2")
    assert is_stale({**mine, "pid": pid})
    for field, other in (("pid_ns", mine["pid_ns"] + 1), ("boot_id", "another-boot")):
        record = {**mine, "pid": pid, field: other}
        assert not is_stale(record)
        path = tmp_path / f"{field}.claim"
        path.write_text(json.dumps(record))
        assert not take(str(path), "task 0 of 2")
        record = {**mine, "pid": os.getpid(), field: other}  # our pid, in another namespace
        path.write_text(json.dumps(record))
        claims.release(str(path))  # is not ours to remove
        assert path.exists()
    assert is_stale(old_format({**mine, "pid": pid}))


def test_the_work_folder_lock_is_an_exclusive_file_naming_its_holder(tmp_path):
    """Not flock: the lock is a file created with O_EXCL holding who holds it, removed on release.
    A holder in another container is waited for or refused while its heartbeat is fresh, taken over
    when it is LOCK_STALE_S old; a dead holder's lock (and the previous version's empty flock file
    once old) is taken over at once."""
    work = str(tmp_path)
    lock = tmp_path / "lock"
    with locked(work):
        record = json.loads(lock.read_text())
        assert record["pid"] == os.getpid() and record["pid_ns"] == owner("")["pid_ns"]
        with pytest.raises(ClaimError) as err:
            with locked(work):
                pass
    assert not lock.exists()
    line = str(err.value)
    assert "\n" not in line and f"another preprocess run is using {work} (same --output-prefix)" in line
    assert f"{lock} is held by pid {os.getpid()} on {record['host']}" in line and f"delete {lock}" in line

    container = {**owner(""), "pid": dead_pid(), "pid_ns": owner("")["pid_ns"] + 1}
    lock.write_text(json.dumps(container))
    with pytest.raises(ClaimError):
        with locked(work):
            pass
    released = []

    def release_soon():
        time.sleep(0.5)
        released.append(True)
        lock.unlink()

    threading.Thread(target=release_soon).start()
    with locked(work, wait=True):  # a task of a multi-task run waits for the setup under way
        assert released
    old = time.time() - procutil.LOCK_STALE_S - 5
    for stale, age in (
        (json.dumps({**owner(""), "pid": dead_pid()}), None),
        (json.dumps(container), old),
        ("", old),
    ):
        lock.write_text(stale)
        if age is not None:
            os.utime(lock, (age, age))
        with locked(work):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
