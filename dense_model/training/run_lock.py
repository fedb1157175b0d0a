"""One job per run directory: an exclusive claim held by global rank 0 for the job's whole life.

The claim is the file ``RUN_DIR/job.lock``, created with ``O_CREAT | O_EXCL`` (atomic on local
disks and on NFSv3+/Lustre/GPFS, unlike ``flock``, which some NFS mounts grant to everyone). It
holds JSON written once: host, pid, the pid's start time, job id (SLURM_JOB_ID or torchrun's run
id), start time and a random token. The holder keeps the file open; a background thread refreshes
the file's mtime through that descriptor every ``HEARTBEAT_S`` seconds (``futimens``: it can only
ever touch this job's own file, never a claim made after it) and checks that ``job.lock`` is still
that file.

A claim is taken over only when provably stale:

- same host: its process is gone (or the pid now belongs to a process started at another time).
  A live process on this host is never stale, however old its heartbeat (a suspended job);
- another host: the file's mtime is older than ``STALE_AFTER_S``, measured against a file created
  now in the same directory, so both times come from the file server's clock (no two hosts'
  clocks are compared).

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

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from dense_model.procutil import process_start_time

LOCK_NAME = "job.lock"
HEARTBEAT_S = 30.0
# A live job refreshes its heartbeat every 30 s; ten minutes of silence means its node is gone
# (a stalled NFS server can delay writes by minutes, hence the margin).
STALE_AFTER_S = 600.0
# A holder that could not refresh its claim for this long stops (after saving), well before
# another host may judge the claim stale.
LOST_AFTER_S = STALE_AFTER_S / 2
# The takeover lock is held for milliseconds; one this old was left by a contender that died.
TAKEOVER_STALE_S = 60.0


class RunDirBusy(RuntimeError):
    """Another live job holds the run directory; the message names it and what to do."""


class RunDirLost(RuntimeError):
    """This job no longer holds (or cannot confirm) its claim: it must not write into the run directory."""


def job_id() -> str:
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or "-"


def _start_time(pid: int) -> float | None:
    """The process's start time; None when it does not run (a zombie included); NaN when alive but
    unreadable (another user's)."""
    return process_start_time(pid)


def _touch(fd: int) -> None:
    """Refresh the claim's mtime to "now" on the file server's clock, through our own descriptor."""
    os.utime(fd)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _read(path: Path) -> tuple[dict | None, tuple[int, int] | None]:
    """(record, identity) of the claim file; (None, None) when there is none. A file being written
    (or torn by a dying job) reads as {} and is judged by its age alone."""
    try:
        with open(path) as f:
            ident = _identity(os.fstat(f.fileno()))
            text = f.read()
    except FileNotFoundError:
        return None, None
    try:
        record = json.loads(text)
    except ValueError:
        record = {}
    return (record if isinstance(record, dict) else {}), ident


def file_age(path: Path) -> float | None:
    """Seconds since ``path`` was last modified, against a file created now next to it (the same
    filesystem, so the same clock); None when ``path`` is gone, 0.0 when no probe can be made."""
    probe = path.with_name(f"{path.name}.probe.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except OSError:
        return 0.0 if path.exists() else None  # cannot judge: never stale
    try:
        now = os.stat(probe).st_mtime
        return max(0.0, now - os.stat(path).st_mtime)
    except FileNotFoundError:
        return None
    finally:
        probe.unlink(missing_ok=True)


def stale_reason(holder: dict, path: Path, stale_after: float | None = None) -> str | None:
    """Why the claim in ``path`` is stale, or None while its job may be alive. On its own host a
    claim is judged by its process (alive: never stale); from another host by the file's age."""
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int):
        started = _start_time(pid)
        recorded = holder.get("pid_started")
        if started is not None and (started != started or recorded is None or abs(started - recorded) <= 1.0):
            return None
        return f"process {pid} is gone"
    age = file_age(path)
    if age is None:
        return "gone"
    limit = STALE_AFTER_S if stale_after is None else stale_after
    if age > limit:
        return f"no heartbeat for {age:.0f} s"
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
    holder, _ = _read(path)
    if holder is not None and stale_reason(holder, path) is None:
        raise RunDirBusy(describe(Path(run_dir), holder))


def _new_record() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_started": _start_time(os.getpid()),
        "job_id": job_id(),
        "started": time.time(),
        "token": uuid.uuid4().hex,
    }


def _create(path: Path, record: dict) -> int:
    """Create ``path`` exclusively with ``record`` in it (fsynced); FileExistsError if it exists."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    try:
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)  # just created by us: nobody else can have replaced it
        raise
    return fd


def _remove_if(path: Path, ident: tuple[int, int], record: dict | None) -> bool:
    """Remove ``path`` if it is the file ``ident`` holding ``record`` (an inode number alone can be
    reused once its file is gone): rename it aside (atomic), check the moved file is that one and
    delete it; anything else moved by mistake is linked back (same inode) and is never deleted.
    True if it was removed."""
    aside = path.with_name(f"{path.name}.aside.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if _read(aside) == (record, ident):
        aside.unlink()
        return True
    try:
        os.link(aside, path)  # put it back: its holder's descriptor still matches
        aside.unlink()
    except FileExistsError:  # a claim created meanwhile: keep both files, delete neither
        print(f"warning: {aside} is a claim moved aside by a takeover race; it was not deleted", flush=True)
    return False


def _take_over(path: Path, stale: tuple[dict, tuple[int, int]], record: dict) -> None:
    """Remove the stale claim ``stale`` (record, identity) at ``path``, holding the takeover lock."""
    mutex = path.with_name(path.name + ".takeover")
    try:
        fd = _create(mutex, record)
    except FileExistsError:
        holder, m_ident = _read(mutex)
        if m_ident is not None and stale_reason(holder, mutex, TAKEOVER_STALE_S) is not None:
            _remove_if(mutex, m_ident, holder)  # left by a contender that died mid-takeover
        time.sleep(0.05)
        return
    try:
        holder, ident = _read(path)
        if (holder, ident) == stale and stale_reason(holder, path) is not None:  # still that stale file
            _remove_if(path, ident, holder)
    finally:
        m_ident = _identity(os.fstat(fd))
        os.close(fd)
        _remove_if(mutex, m_ident, record)


class RunDirClaim:
    """An exclusive claim on ``path`` (a lock file) with a heartbeat; see the module docstring."""

    def __init__(self, path: Path, fd: int, record: dict):
        self.path, self.record, self._fd = path, record, fd
        self._ident = _identity(os.fstat(fd))
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
        record = _new_record()
        for _ in range(20):  # create; or take over a stale claim and create
            try:
                return cls(path, _create(path, record), record)
            except FileExistsError:
                pass
            holder, ident = _read(path)
            if ident is None:
                continue  # released meanwhile
            if stale_reason(holder, path) is None:
                raise RunDirBusy(busy(holder))
            _take_over(path, (holder, ident), record)
        raise RunDirBusy(busy(_read(path)[0] or {}))

    # -- the holder's side ---------------------------------------------------------------------

    def _owned(self) -> bool:
        """``path`` is still this job's file (OSError when that cannot be told right now)."""
        try:
            return _identity(os.stat(self.path)) == self._ident
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
                    _remove_if(self.path, self._ident, self.record)
                break
            except OSError as err:
                if attempt == 2:
                    print(f"warning: could not remove the claim {self.path} ({err})", flush=True)
                time.sleep(0.5 * 2**attempt)
        os.close(self._fd)
