"""One job per run directory: an exclusive claim held by global rank 0 for the job's whole life.

The claim is the file ``RUN_DIR/job.lock``, created with ``O_CREAT | O_EXCL`` (atomic on local
disks and on NFSv3+/Lustre/GPFS, unlike ``flock``, which some NFS mounts grant to everyone). It
holds JSON: host, pid, the pid's start time, job id (SLURM_JOB_ID or torchrun's run id), start time
and a heartbeat that a background thread refreshes every ``HEARTBEAT_S`` seconds. A claim is taken
over only when provably stale:

- same host and its process is gone (or the pid now belongs to a process started at another time);
- or, from any host, its heartbeat is older than ``STALE_AFTER_S`` (a node that died).

A takeover renames the stale file aside (only one contender's rename succeeds), checks it moved
the claim it judged stale, and then creates its own. The claim is removed on exit; one left by a
SIGKILLed job is stale as soon as its process is gone, so the relaunch that resumes never waits.

    claim = RunDirClaim.acquire(run_dir)    # raises RunDirBusy (one-line message) if held
    ...
    claim.release()
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

LOCK_NAME = "job.lock"
HEARTBEAT_S = 30.0
# A live job refreshes its heartbeat every 30 s; ten minutes of silence means its node is gone
# (a stalled NFS server can delay writes by minutes, hence the margin).
STALE_AFTER_S = 600.0


class RunDirBusy(RuntimeError):
    """Another live job holds the run directory; the message names it and what to do."""


def job_id() -> str:
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or "-"


def _start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written by a dying job: judged by the file's age below


def _stale_reason(holder: dict, path: Path) -> str | None:
    """Why the claim in ``path`` is stale, or None while its job may be alive."""
    beat = holder.get("heartbeat")
    if beat is None:
        try:
            beat = path.stat().st_mtime
        except FileNotFoundError:
            return "gone"
    if time.time() - beat > STALE_AFTER_S:
        return f"no heartbeat for {time.time() - beat:.0f} s"
    if holder.get("host") == socket.gethostname() and holder.get("pid"):
        started = _start_time(holder["pid"])
        if started is None or abs(started - holder.get("pid_started", started)) > 1.0:
            return f"process {holder['pid']} is gone"
    return None


def describe(run_dir: Path, holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return (
        f"run directory {run_dir} is in use by job {holder.get('job_id', '?')} "
        f"(host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {since}); wait for it to "
        f"finish or stop it, or pick another run_dir=. A claim whose job is dead is taken over "
        f"automatically (on another host after {STALE_AFTER_S:.0f} s without heartbeat); delete "
        f"{run_dir / LOCK_NAME} only if you are sure no job uses the directory"
    )


def check_free(run_dir: str | os.PathLike) -> None:
    """Raise RunDirBusy if a live job holds ``run_dir`` (the launcher's check before torchrun)."""
    path = Path(run_dir) / LOCK_NAME
    holder = _read(path)
    if holder is not None and _stale_reason(holder, path) is None:
        raise RunDirBusy(describe(Path(run_dir), holder))


class RunDirClaim:
    def __init__(self, path: Path, record: dict):
        self.path, self.record = path, record
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="run-dir-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike) -> RunDirClaim:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_NAME
        now = time.time()
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_started": _start_time(os.getpid()),
            "job_id": job_id(),
            "started": now,
            "heartbeat": now,
        }
        for _ in range(3):  # create; or take over a stale claim and create
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(path)
                if holder is None:
                    continue  # released meanwhile
                if _stale_reason(holder, path) is None:
                    raise RunDirBusy(describe(run_dir, holder)) from None
                aside = path.with_name(f"{LOCK_NAME}.stale.{record['host']}.{record['pid']}")
                try:
                    os.rename(path, aside)
                except FileNotFoundError:
                    continue  # another contender moved it first
                if _read(aside) != holder:  # we moved a fresh claim made meanwhile: put it back
                    try:
                        os.link(aside, path)
                    except FileExistsError:
                        pass
                    os.unlink(aside)
                    continue
                os.unlink(aside)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            return cls(path, record)
        holder = _read(path) or {}
        raise RunDirBusy(describe(run_dir, holder))

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if _read(self.path) != self.record:
                print(f"warning: the claim {self.path} is no longer this job's", flush=True)
                return
            self.record = {**self.record, "heartbeat": time.time()}
            tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.record))
            os.replace(tmp, self.path)  # rename: readers never see a half-written claim

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if _read(self.path) == self.record:
            self.path.unlink(missing_ok=True)
