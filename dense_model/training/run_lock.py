"""One job per run directory: an exclusive claim held by global rank 0 for the job's whole life.

The claim is the file ``RUN_DIR/job.lock``, created with ``O_CREAT | O_EXCL`` (atomic on local
disks and on NFSv3+/Lustre/GPFS, unlike ``flock``, which some NFS mounts grant to everyone). It
holds JSON written once: who holds it (``procutil.holder_identity``: host, boot id, pid namespace,
pid, the pid's start time, SLURM job and restart count), job id (SLURM_JOB_ID or torchrun's run
id), start time and a random token. The holder keeps the file open; a background thread refreshes
the file's mtime through that descriptor every ``HEARTBEAT_S`` seconds (``futimens``: it can only
ever touch this job's own file, never a claim made after it) and checks that ``job.lock`` is still
that file.

A claim is taken over only when provably stale:

- same host, boot and pid namespace: its process is gone (or the pid now belongs to a process
  started at another time). A live process there is never stale, however old its heartbeat (a
  suspended job);
- anywhere else (another host, or a container with its own pid namespace under the same
  hostname, whose pid means nothing here): at once if this job is the same SLURM job requeued
  (same SLURM_JOB_ID, a higher SLURM_RESTART_COUNT); else when the file's mtime is older than
  ``STALE_AFTER_S``, measured against a file created now in the same directory, so both times come
  from the file server's clock (no two hosts' clocks are compared).

A takeover holds ``job.lock.takeover`` (``O_EXCL``, milliseconds), checks again that ``job.lock``
is the very file it judged stale, renames it aside and checks the moved file is that one; a claim
moved by mistake is put back with ``link`` (same inode: its holder never notices) and is never
deleted. Fresh claims are only ever created where no claim exists, so with any number of
contenders no fresh claim is deleted.

When the heartbeat fails (ENOSPC, EIO, ESTALE, a failed stat) it retries with backoff; after
``LOST_AFTER_S`` without a successful refresh (half of ``STALE_AFTER_S``: before anyone may take the
directory over) ``lost()`` turns True and the trainer saves and stops on every rank. If ``job.lock``
is no longer this job's file (a suspended job woken after a takeover), ``lost()`` turns True too and
``verify()`` (rank 0, before every save) fails: the trainer stops without writing anything.

    claim = RunDirClaim.acquire(run_dir)    # raises RunDirBusy (one-line message) if held
    ...
    claim.lost(), claim.verify()
    claim.release()
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from dense_model.procutil import (
    claim_file,
    file_identity,
    holder_identity,
    read_lock,
    remove_if,
    stale_by_heartbeat,
)

LOCK_NAME = "job.lock"
HEARTBEAT_S = 30.0
# A live job refreshes its heartbeat every 30 s; ten minutes of silence means its node is gone
# (a stalled NFS server can delay writes by minutes, hence the margin).
STALE_AFTER_S = 600.0
# A holder that could not refresh its claim for this long stops (after saving), well before
# another host may judge the claim stale.
LOST_AFTER_S = STALE_AFTER_S / 2


class RunDirBusy(RuntimeError):
    """Another live job holds the run directory; the message names it and what to do."""


class RunDirLost(RuntimeError):
    """This job no longer holds (or cannot confirm) its claim: it must not write into the run directory."""


def job_id() -> str:
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or "-"


def _touch(fd: int) -> None:
    """Refresh the claim's mtime to "now" on the file server's clock, through our own descriptor."""
    os.utime(fd)


def stale_reason(holder: dict, path: Path, stale_after: float | None = None) -> str | None:
    """Why the claim in ``path`` is stale, or None while its job may be alive. Where its pid can be
    judged (same host, boot and pid namespace) by its process (alive: never stale); else stale at
    once if this job is its SLURM job requeued, or by the file's age (``procutil.stale_by_heartbeat``)."""
    return stale_by_heartbeat(holder, path, STALE_AFTER_S if stale_after is None else stale_after)


def describe(run_dir: Path, holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return (
        f"run directory {run_dir} is in use by job {holder.get('job_id', '?')} "
        f"(host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {since}); wait for it to "
        f"finish or stop it, or pick another run_dir=. A claim whose job is dead is taken over "
        f"automatically (on another host or container after {STALE_AFTER_S:.0f} s without heartbeat); delete "
        f"{run_dir / LOCK_NAME} only if you are sure no job uses the directory"
    )


def check_free(run_dir: str | os.PathLike) -> None:
    """Raise RunDirBusy if a live job holds ``run_dir`` (the launcher's check before torchrun)."""
    path = Path(run_dir) / LOCK_NAME
    holder, _ = read_lock(path)
    if holder is not None and stale_reason(holder, path) is None:
        raise RunDirBusy(describe(Path(run_dir), holder))


def _new_record() -> dict:
    return {**holder_identity(), "job_id": job_id(), "started": time.time(), "token": uuid.uuid4().hex}


class RunDirClaim:
    """An exclusive claim on ``path`` (a lock file) with a heartbeat; see the module docstring."""

    def __init__(self, path: Path, fd: int, record: dict):
        self.path, self.record, self._fd = path, record, fd
        self._ident = file_identity(os.fstat(fd))
        self._lost: str | None = None
        self._taken = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="run-dir-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike) -> RunDirClaim:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        return cls.acquire_file(run_dir / LOCK_NAME, lambda holder: describe(run_dir, holder))

    @classmethod
    def acquire_file(cls, path: Path, busy: Callable[[dict], str]) -> RunDirClaim:
        """Claim the lock file ``path``; RunDirBusy(busy(holder)) while a live job holds it."""
        fd, holder = claim_file(path, _new_record(), stale_reason)
        if fd is None:
            raise RunDirBusy(busy(holder))
        return cls(path, fd, holder)

    # -- the holder's side ---------------------------------------------------------------------

    def _owned(self) -> bool:
        """``path`` is still this job's file (OSError when that cannot be told right now)."""
        try:
            return file_identity(os.stat(self.path)) == self._ident
        except FileNotFoundError:
            return False

    def _set_lost(self, reason: str, taken: bool) -> None:
        with self._lock:  # the heartbeat thread and verify() may both find it
            if self._lost is None:
                print(f"warning: {reason}", flush=True)
                self._lost = reason
            self._taken = self._taken or taken

    def _beat(self) -> None:
        last_ok, failures, wait = time.monotonic(), 0, HEARTBEAT_S
        while not self._stop.wait(wait):
            try:
                if not self._owned():
                    self._set_lost(
                        f"the claim {self.path} is no longer this job's: another job took it over", True
                    )
                    return
                _touch(self._fd)
            except OSError as err:
                failures += 1
                wait = min(HEARTBEAT_S, HEARTBEAT_S / 30 * 2 ** (failures - 1))  # 1, 2, 4 ... 30 s
                if time.monotonic() - last_ok >= LOST_AFTER_S:
                    self._set_lost(
                        f"could not refresh the claim {self.path} for {time.monotonic() - last_ok:.0f} s "
                        f"({err}); stopping before another job may take the run directory over",
                        False,
                    )
                continue
            last_ok, failures, wait = time.monotonic(), 0, HEARTBEAT_S

    def lost(self) -> bool:
        """True once the claim could not be refreshed for ``LOST_AFTER_S`` or is another job's."""
        return self._lost is not None

    @property
    def lost_reason(self) -> str | None:
        return self._lost

    def verify(self, attempts: int = 3) -> bool:
        """Is ``path`` still this job's claim? Retries a failing stat; False when not, or when that
        cannot be confirmed (then nothing may be written)."""
        if self._taken:
            return False
        for attempt in range(attempts):
            try:
                if self._owned():
                    return True
                self._set_lost(
                    f"the claim {self.path} is no longer this job's: another job took it over", True
                )
                return False
            except OSError as err:
                error = err
                time.sleep(0.5 * 2**attempt)
        self._set_lost(f"cannot check the claim {self.path} ({error})", True)
        return False

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        for attempt in range(3):
            try:
                if not self._taken:
                    remove_if(self.path, self._ident, self.record)
                break
            except OSError as err:
                if attempt == 2:
                    print(f"warning: could not remove the claim {self.path} ({err})", flush=True)
                time.sleep(0.5 * 2**attempt)
        os.close(self._fd)
