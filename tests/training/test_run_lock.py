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

from dense_model.procutil import process_start_time
from dense_model.training.run_lock import (
    LOCK_NAME,
    STALE_AFTER_S,
    RunDirBusy,
    RunDirClaim,
    check_free,
)


def write_claim(run_dir, pid, host=None, age=None):
    """A claim as another job writes it; ``age``: seconds since its last heartbeat (the file's mtime)."""
    now = time.time()
    record = {
        "host": host or socket.gethostname(),
        "pid": pid,
        "pid_started": process_start_time(pid),
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
    from dense_model.procutil import read_lock, remove_if

    write_claim(tmp_path, dead_pid())
    stale = read_lock(tmp_path / LOCK_NAME)
    (tmp_path / LOCK_NAME).unlink()  # the stale claim is removed by another contender ...
    fresh = RunDirClaim.acquire(tmp_path)  # ... and a fresh one made
    assert not remove_if(tmp_path / LOCK_NAME, stale[1], stale[0])
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


def identity_record(pid, **fields):
    """A claim as this version writes it, for ``pid`` on this host (fields overridden)."""
    from dense_model.procutil import holder_identity

    record = {**holder_identity(), "pid": pid, "pid_started": process_start_time(pid)}
    return {**record, "job_id": "other-job", "started": time.time() - 60, "token": "other", **fields}


def put_claim(run_dir, record, age=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps(record))
    if age is not None:
        old = time.time() - age
        os.utime(run_dir / LOCK_NAME, (old, old))


def test_a_live_pid_started_at_another_time_is_another_process(tmp_path):
    """A dead job's pid reused by a live process does not keep its run directory in use: the pid's
    start time differs from the recorded one (procutil.holder_state, which the export lock shares)."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        put_claim(tmp_path, identity_record(sleeper.pid))
        with pytest.raises(RunDirBusy):  # its own start time: that process, alive
            check_free(tmp_path)
        put_claim(tmp_path, identity_record(sleeper.pid, pid_started=process_start_time(sleeper.pid) - 1000))
        check_free(tmp_path)
        claim = RunDirClaim.acquire(tmp_path)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == claim.record["token"]
        claim.release()
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("field", ["pid_ns", "boot_id"])
def test_a_holder_in_another_pid_namespace_is_judged_by_its_heartbeat(tmp_path, field):
    """Same hostname, another pid namespace or boot (a container with host networking): its pid,
    dead here, says nothing; the claim stands until its heartbeat is STALE_AFTER_S old."""
    other = {"pid_ns": 4026530000, "boot_id": "00000000-0000-0000-0000-000000000000"}[field]
    put_claim(tmp_path, identity_record(dead_pid(), **{field: other}), age=STALE_AFTER_S - 60)
    with pytest.raises(RunDirBusy, match="is in use by job other-job"):
        RunDirClaim.acquire(tmp_path)
    put_claim(tmp_path, identity_record(dead_pid(), **{field: other}), age=STALE_AFTER_S + 5)
    RunDirClaim.acquire(tmp_path).release()


NAMESPACED_HOLDER = """
import sys
from dense_model.data.preprocess import claims
from dense_model.training import run_lock
claim = run_lock.RunDirClaim.acquire(sys.argv[1])
assert claims.take(sys.argv[2], "task 0 of 2")
print("claimed", claim.record["pid"], flush=True)
sys.stdin.readline()
"""


def _can_unshare_pids() -> bool:
    try:
        return (
            subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"], capture_output=True).returncode
            == 0
        )
    except OSError:
        return False


@pytest.mark.skipif(not _can_unshare_pids(), reason="needs `unshare --pid` (root, a permitting sandbox)")
def test_a_job_in_its_own_pid_namespace_keeps_its_lock_and_claims(tmp_path):
    """A real holder in another pid namespace under our hostname (pid 1 there; our pid 1 is another
    process): the run lock and a preprocessing claim it holds are live here; the run lock is taken
    over only once its heartbeat is STALE_AFTER_S old."""
    from dense_model.data.preprocess import claims

    run_dir, claim_path = tmp_path / "run", tmp_path / "task.0.claim"
    holder = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", NAMESPACED_HOLDER]
        + [str(run_dir), str(claim_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "claimed 1\n"
        with pytest.raises(RunDirBusy):
            check_free(run_dir)
        with pytest.raises(RunDirBusy):
            RunDirClaim.acquire(run_dir)
        assert not claims.is_stale(claims.read_claim(str(claim_path)))
        assert not claims.take(str(claim_path), "task 0 of 2")
        old = time.time() - STALE_AFTER_S - 5
        os.utime(run_dir / LOCK_NAME, (old, old))  # its heartbeat stopped ten minutes ago
        RunDirClaim.acquire(run_dir).release()
    finally:
        holder.communicate("", timeout=60)


@pytest.fixture
def slurm(monkeypatch):
    """Set this process's SLURM job id and restart count."""

    def set_job(job, restart):
        monkeypatch.setenv("SLURM_JOB_ID", job)
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart))

    return set_job


def test_a_requeue_on_another_host_takes_its_claim_over_at_once(tmp_path, slurm):
    """The same SLURM job restarted (SLURM_RESTART_COUNT higher) on another node: SLURM ended the old
    one, whose claim still has a fresh heartbeat. A task of the same run of the job (srun's other
    task, a second step) or another job is refused."""
    fresh = identity_record(1, host="node-that-is-not-us", slurm_job="4242", slurm_restart=0)
    slurm("4242", 0)  # the same run of the job: another task of its step, not a requeue
    put_claim(tmp_path, fresh)
    with pytest.raises(RunDirBusy):
        RunDirClaim.acquire(tmp_path)
    slurm("4243", 1)  # another job
    with pytest.raises(RunDirBusy):
        RunDirClaim.acquire(tmp_path)
    slurm("4242", 1)  # requeued
    claim = RunDirClaim.acquire(tmp_path)
    assert claim.record["slurm_job"] == "4242" and claim.record["slurm_restart"] == 1
    claim.release()


def test_the_heartbeat_notices_a_takeover_before_any_save(tmp_path, monkeypatch):
    """A job whose job.lock was taken over (it was suspended past STALE_AFTER_S on another host)
    learns it from its heartbeat, without calling verify(): the trainer stops at its next step."""
    from dense_model.training import run_lock

    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.01)
    claim = RunDirClaim.acquire(tmp_path)
    lock = tmp_path / LOCK_NAME
    os.rename(lock, tmp_path / "aside")  # the takeover's rename, then the new job's claim
    put_claim(tmp_path, identity_record(os.getppid(), token="new"))
    assert _wait_for(claim.lost, limit=30)
    assert "is no longer this job's: another job took it over" in claim.lost_reason
    claim.release()
    assert json.loads(lock.read_text())["token"] == "new"  # the new job's claim, untouched


def _train_taken_over_midway(rank, world_size, config, out_dir):
    """pretrain's own main() on 2 gloo ranks; on rank 0 a thread plays the job that takes job.lock
    over once step 2 is logged (as after a suspension past STALE_AFTER_S on another host)."""
    import contextlib
    import io
    import threading

    from dense_model.training import pretrain, run_lock

    run_lock.HEARTBEAT_S = 0.01
    run_dir = Path(out_dir) / "run"

    def take_over():
        metrics = run_dir / "metrics.jsonl"
        while True:
            steps = (
                [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
                if metrics.exists()
                else []
            )
            if steps and steps[-1] >= 2:
                break
            time.sleep(0.005)
        os.rename(run_dir / LOCK_NAME, run_dir / "job.lock.aside")
        (run_dir / LOCK_NAME).write_text(json.dumps({"token": "new"}))
        (Path(out_dir) / "taken_at").write_text(str(steps[-1]))

    if rank == 0:
        threading.Thread(target=take_over, daemon=True).start()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = pretrain.main([config, "training.train_iters=40", "checkpoint.save_interval=100"])
    (Path(out_dir) / f"rank{rank}.txt").write_text(f"{code}\n{out.getvalue()}")


@pytest.mark.slow
def test_a_job_whose_claim_was_taken_over_stops_within_a_step_or_two(tiny_config, tmp_path):
    """The heartbeat finds job.lock is no longer this job's: every rank stops at its next step,
    without saving; it does not train on (and log metrics) until its next save."""
    from dense_model.testing import spawn_workers

    config, run_dir = tiny_config("run")
    spawn_workers(_train_taken_over_midway, 2, str(config), str(run_dir.parent))
    code0, out0 = (run_dir.parent / "rank0.txt").read_text().split("\n", 1)
    code1, _ = (run_dir.parent / "rank1.txt").read_text().split("\n", 1)
    assert (code0, code1) == ("1", "1"), out0
    assert "is no longer this job's: another job took it over" in out0
    assert "no longer holds its run directory: stopped without saving" in out0
    taken_at = int((run_dir.parent / "taken_at").read_text())
    steps = [
        r["step"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]
    assert steps[-1] <= taken_at + 2, (taken_at, steps)
    assert not (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").exists()
    assert json.loads((run_dir / LOCK_NAME).read_text()) == {"token": "new"}
