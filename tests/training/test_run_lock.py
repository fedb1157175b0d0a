"""The run-directory claim: one holder at a time, stale claims taken over, live ones refused.

Claims of other jobs are written as those jobs write them (the same JSON), with real processes:
a live one (this test's own interpreter) and a dead one (a child that has exited)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dense_model.training.run_lock import (
    LOCK_NAME,
    STALE_AFTER_S,
    RunDirBusy,
    RunDirClaim,
    _start_time,
    check_free,
)


def write_claim(run_dir, pid, host=None, age=None):
    """A claim as another job writes it; ``age``: seconds since its last heartbeat (the file's mtime)."""
    now = time.time()
    record = {
        "host": host or socket.gethostname(),
        "pid": pid,
        "pid_started": _start_time(pid),
        "job_id": "other-job",
        "started": now - 60,
        "token": "other",
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps(record))
    if age is not None:
        os.utime(run_dir / LOCK_NAME, (now - age, now - age))
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
    """Judged by the file's mtime against a file created now in the same directory: the clock in
    the claim's JSON (another host's) plays no part."""
    write_claim(tmp_path, 1, host="node-that-is-not-us", age=STALE_AFTER_S - 60)
    with pytest.raises(RunDirBusy, match="host node-that-is-not-us, pid 1"):
        RunDirClaim.acquire(tmp_path)
    write_claim(tmp_path, 1, host="node-that-is-not-us", age=STALE_AFTER_S + 5)
    RunDirClaim.acquire(tmp_path).release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no probe, aside or takeover file left


def test_claim_of_a_live_process_on_this_host_is_kept_however_old(tmp_path):
    """A live process on this host (a suspended job, a stalled NFS) is never stale: the pid test
    comes before the age test."""
    write_claim(tmp_path, os.getppid(), age=10 * STALE_AFTER_S)  # pytest's parent: alive
    with pytest.raises(RunDirBusy):
        check_free(tmp_path)
    with pytest.raises(RunDirBusy):
        RunDirClaim.acquire(tmp_path)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == "other"


def _failing_touch(fd):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def test_heartbeat_that_cannot_write_flags_the_claim_lost_and_release_cleans_up(tmp_path, monkeypatch):
    """Every refresh fails (ENOSPC): the heartbeat keeps retrying, flags the claim lost (the trainer
    then saves and stops) while it is still this job's, and release removes job.lock."""
    from dense_model.training import run_lock

    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.01)
    monkeypatch.setattr(run_lock, "LOST_AFTER_S", 0.05)
    monkeypatch.setattr(run_lock, "_touch", _failing_touch)
    claim = RunDirClaim.acquire(tmp_path)
    assert _wait_for(claim.lost)
    assert "could not refresh the claim" in claim.lost_reason and "No space left" in claim.lost_reason
    assert claim._thread.is_alive()  # still retrying, not dead
    assert claim.verify()  # still ours: the save before stopping is allowed
    claim.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _wait_for(condition, limit=60.0):
    deadline = time.monotonic() + limit
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


OLD_HOLDER = """
import socket, sys
socket.gethostname = lambda: "node-a"  # the holder runs on another host
from dense_model.training import run_lock
run_lock.HEARTBEAT_S = 0.01
claim = run_lock.RunDirClaim.acquire(sys.argv[1])
print("claimed", flush=True)
sys.stdin.readline()  # stopped (SIGSTOP) and continued meanwhile
print("verify", claim.verify(), "lost", claim.lost(), flush=True)
claim.release()
print("released", flush=True)
"""


def test_suspended_holder_taken_over_does_not_touch_the_new_claim(tmp_path):
    """A job on another host is suspended past STALE_AFTER_S and taken over; when it wakes, its
    heartbeat and its release leave the new claim as it is, and its pre-save check fails."""
    import signal

    holder = subprocess.Popen(
        [sys.executable, "-c", OLD_HOLDER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == "claimed\n"
    holder.send_signal(signal.SIGSTOP)
    lock = tmp_path / LOCK_NAME
    old = time.time() - STALE_AFTER_S - 5
    os.utime(lock, (old, old))  # ten minutes without a heartbeat, as its file shows
    claim = RunDirClaim.acquire(tmp_path)  # taken over
    before = os.stat(lock)
    holder.send_signal(signal.SIGCONT)
    out, _ = holder.communicate("go\n", timeout=60)
    assert out.splitlines()[-2:] == ["verify False lost True", "released"], out
    assert f"warning: the claim {lock} is no longer this job's: another job took it over" in out
    after = os.stat(lock)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )
    assert json.loads(lock.read_text()) == claim.record
    assert claim.verify() and not claim.lost()
    claim.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _contender(run_dir, start, results):
    from dense_model.training.run_lock import RunDirBusy, RunDirClaim

    start.wait(120)
    claim = None
    try:
        claim = RunDirClaim.acquire(run_dir)
        results.put(("won", claim.record["token"]))
    except RunDirBusy:
        results.put(("busy", None))
    start.wait(120)  # the winner holds the claim until every contender has tried
    if claim is not None:
        claim.release()


def test_three_contenders_for_a_stale_claim_one_wins_and_keeps_it(tmp_path):
    import multiprocessing as mp

    write_claim(tmp_path, dead_pid())
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_contender, args=(str(tmp_path), start, results)) for _ in range(3)]
    for p in procs:
        p.start()
    start.wait(120)
    outcomes = sorted(results.get(timeout=120) for _ in procs)
    winners = [token for what, token in outcomes if what == "won"]
    assert len(winners) == 1, outcomes
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == winners[0]  # the winner's, not deleted
    start.wait(120)
    for p in procs:
        p.join(60)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_takeover_removes_only_the_claim_it_judged_stale(tmp_path):
    """The rename-aside of a takeover that finds a fresh claim in place of the stale one it judged
    puts it back (same file: its holder's heartbeat sees no change) and deletes nothing, even when
    the fresh file reuses the stale one's inode number."""
    from dense_model.training.run_lock import _read, _remove_if

    write_claim(tmp_path, dead_pid())
    stale = _read(tmp_path / LOCK_NAME)
    (tmp_path / LOCK_NAME).unlink()  # the stale claim is removed by another contender ...
    fresh = RunDirClaim.acquire(tmp_path)  # ... and a fresh one made
    assert not _remove_if(tmp_path / LOCK_NAME, stale[1], stale[0])
    assert fresh.verify()
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == fresh.record
    fresh.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _train_with_failing_heartbeat(rank, world_size, config, out_dir):
    """pretrain's own main() on 2 gloo ranks; rank 0's heartbeat can never refresh the claim."""
    import contextlib
    import io

    from dense_model.training import pretrain, run_lock

    run_lock.HEARTBEAT_S, run_lock.LOST_AFTER_S = 0.01, 0.0
    run_lock._touch = _failing_touch
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = pretrain.main([config, "training.train_iters=40", "checkpoint.save_interval=100"])
    (Path(out_dir) / f"rank{rank}.txt").write_text(f"{code}\n{out.getvalue()}")


@pytest.mark.slow
def test_training_stops_after_saving_when_the_heartbeat_cannot_write(tiny_config, tmp_path):
    """Both ranks stop at the same step (the decision is collective), after saving that step; the
    job exits 1 naming the cause, and job.lock is gone (the claim was released, nobody took it)."""
    from dense_model.testing import spawn_workers

    config, run_dir = tiny_config("lost")
    spawn_workers(_train_with_failing_heartbeat, 2, str(config), str(tmp_path))
    code0, out0 = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    code1, _ = (tmp_path / "rank1.txt").read_text().split("\n", 1)
    assert (code0, code1) == ("1", "0"), out0
    latest = int((run_dir / "checkpoints/latest_checkpointed_iteration.txt").read_text())
    assert 1 <= latest < 40
    assert f"claim lost: saved step {latest} and stopping" in out0
    assert (
        f"error: could not refresh the claim {run_dir / LOCK_NAME}" in out0 and "relaunch to resume" in out0
    )
    assert not list(run_dir.glob(f"{LOCK_NAME}*"))
