"""Process lifetime helpers shared by the trainer and the data toolkit, and who holds a lock file.

``die_with_parent(parent_pid)`` asks Linux to SIGKILL this process when its parent dies
(``PR_SET_PDEATHSIG``), so a worker never outlives the process that watches it (a torchrun agent
killed with SIGKILL, a preprocessing run killed midway), and tells whether the parent already died
before the request took effect.

Lock files (the run directory's ``job.lock``, an export's lock, the preprocessing work folder's
lock and claims) name their holder with ``holder_identity()``: host, boot id
(``/proc/sys/kernel/random/boot_id``), pid namespace (the inode of ``/proc/self/ns/pid``), pid and
the pid's start time, and the SLURM job and its restart count. ``holder_state`` judges a holder by
its pid only where that pid means the same process as here: same host, same boot, same pid
namespace (containers with host networking share a hostname, not pids). Anywhere else it is
``ELSEWHERE``: judged by its heartbeat or kept as live, never taken over because a pid is dead
here. ``requeued(holder)``: this process is the same SLURM job restarted (a requeued job keeps its
SLURM_JOB_ID, each array task has its own, and SLURM_RESTART_COUNT grows), so SLURM ended the
holder; tasks and steps of one run of a job share both numbers and are never a requeue of each
other. Records written before these fields existed are judged by host and pid, as they were.

``create_exclusive``/``read_lock``/``remove_if``/``claim_file`` are the ``O_EXCL`` lock file
itself (no ``flock``: some NFS mounts grant it to everyone), with race-free takeover of a stale one;
``held_lock`` holds one for a block with a heartbeat (the preprocessing work folder's lock, the lock
of a folder being replaced: ``fsreplace``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> bool:
    """Get SIGKILLed when the parent dies. Returns False when ``parent_pid`` is no longer our parent:
    it died between our start and the request (the kernel only signals deaths that come after it),
    so the caller must exit now. Elsewhere than Linux this only reports the check."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    return os.getppid() == parent_pid


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), the identity of a pid that may have
    been reused; None when no such process runs: gone, or a zombie (exited, not yet reaped by its
    parent: it holds nothing, yet ``kill(pid, 0)`` still succeeds); NaN for another user's live
    process whose start cannot be read."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        return float("nan")


def is_torchrun_agent(pid: int) -> bool:
    """Whether process ``pid`` runs torchrun (``torch.distributed.run``, or ``dense_model.launcher
    --torchrun`` as run_pretrain.sh starts it); True where /proc is missing."""
    if not os.path.isdir("/proc"):
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # the process is gone
        return False
    return "torch.distributed.run" in cmdline or "torchrun" in cmdline


def kill_process_tree(pid: int, timeout: float = 30.0) -> None:
    """SIGKILL ``pid`` and every process below it, as a crashed node would lose them. The tree is
    collected first: torchrun puts its workers in sessions of their own, so a process-group kill
    misses them. Every process of the tree is stopped (SIGSTOP) before any is killed, and the tree
    collected again until no new process appears: a process forking at that moment (a checkpoint
    writer or data-loader worker started mid-save) would otherwise leave a child the list missed,
    orphaned when its parent dies. A process may kill its own tree: it is not stopped, and dies last."""
    import psutil  # only the tools that kill jobs need it

    root = psutil.Process(pid)
    tree: dict[int, psutil.Process] = {}
    while True:
        try:
            found = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            found = []
        for child in list(tree.values()):  # children of stopped processes (forked before the stop)
            try:
                found += child.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        new = [p for p in found if p.pid not in tree]
        if not new:
            break
        for proc in new:
            tree[proc.pid] = proc
            if proc.pid == os.getpid():
                continue
            try:
                proc.send_signal(signal.SIGSTOP)
            except psutil.NoSuchProcess:
                pass
    me = tree.pop(os.getpid(), None)
    for proc in tree.values():
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    if me is not None:
        me.kill()
    psutil.wait_procs(list(tree.values()), timeout=timeout)


# -- who holds a lock ----------------------------------------------------------------------------

LIVE, GONE, ELSEWHERE = "live", "gone", "elsewhere"  # holder_state's answers


def boot_id() -> str | None:
    """This kernel's boot id (the same in every container of one host, new at each boot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def pid_namespace() -> int | None:
    """The inode of this process's pid namespace: pids mean the same process only within it."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def slurm_restart_count() -> int:
    """How many times SLURM restarted this job (requeue, node failure); 0 when never or no SLURM."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def holder_identity() -> dict:
    """The fields that identify this process in a lock file (see the module docstring)."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "boot_id": boot_id(),
        "pid_ns": pid_namespace(),
        "pid": pid,
        "pid_started": process_start_time(pid),
        "slurm_job": os.environ.get("SLURM_JOB_ID") or None,
        "slurm_restart": slurm_restart_count(),
    }


def _where(holder: dict) -> str | None:
    """Why ``holder``'s pid cannot be judged here (another host, boot or pid namespace); None if it can.
    A field the record lacks (written by an older version) is not compared."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return f"host {holder.get('host')}"
    if "boot_id" in holder and holder["boot_id"] != boot_id():
        return "another boot of this host (or another machine of this name)"
    if "pid_ns" in holder and holder["pid_ns"] != pid_namespace():
        return "another pid namespace (a container) on this host"
    return None


def holder_state(holder: dict) -> tuple[str, str]:
    """(LIVE | GONE | ELSEWHERE, why) for the process a lock record names. LIVE: its pid runs here
    and started when recorded (or its start cannot be read/compared). GONE: the pid is dead here or
    now another process. ELSEWHERE: its pid means nothing here (``_where``)."""
    where = _where(holder)
    if where is not None:
        return ELSEWHERE, where
    pid = holder["pid"]
    started = process_start_time(pid)
    if started is None:
        return GONE, f"process {pid} is gone"
    recorded = holder.get("pid_started")
    if started != started or not isinstance(recorded, (int, float)) or abs(started - recorded) <= 1.0:
        return LIVE, f"process {pid} runs"
    return GONE, f"process {pid} is gone (pid {pid} is now another process)"


def is_this_process(holder: dict) -> bool:
    """Whether ``holder`` names this very process."""
    if _where(holder) is not None or holder["pid"] != os.getpid():
        return False
    recorded = holder.get("pid_started")
    return not isinstance(recorded, (int, float)) or abs(recorded - process_start_time(os.getpid())) <= 1.0


def requeued(holder: dict) -> str | None:
    """Why ``holder`` is an earlier run of this SLURM job (a requeue: SLURM ended it), or None."""
    job, restart = os.environ.get("SLURM_JOB_ID"), slurm_restart_count()
    theirs = holder.get("slurm_restart")
    if job and holder.get("slurm_job") == job and isinstance(theirs, int) and theirs < restart:
        return f"SLURM job {job} was requeued (restart {theirs} -> {restart})"
    return None


# -- the lock file --------------------------------------------------------------------------------


def file_identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def read_lock(path: Path) -> tuple[dict | None, tuple[int, int] | None]:
    """(record, identity) of the lock file; (None, None) when there is none. A file being written
    (or torn by a dying holder) reads as {}."""
    try:
        with open(path) as f:
            ident = file_identity(os.fstat(f.fileno()))
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


def stale_by_heartbeat(holder: dict, path: Path, stale_after: float) -> str | None:
    """Why the lock ``path`` held by ``holder`` is stale, or None while its holder may be alive:
    judged by its pid where it can be (alive: never stale, however old the file), else a requeue
    of this SLURM job, else the file's mtime older than ``stale_after`` (the holder's heartbeat)."""
    state, why = holder_state(holder)
    if state != ELSEWHERE:
        return why if state == GONE else None
    again = requeued(holder)
    if again:
        return again
    age = file_age(path)
    if age is None:
        return "gone"
    return f"no heartbeat for {age:.0f} s" if age > stale_after else None


def create_exclusive(path: Path, record: dict) -> int:
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


def remove_if(path: Path, ident: tuple[int, int], record: dict | None) -> bool:
    """Remove ``path`` if it is the file ``ident`` holding ``record`` (an inode number alone can be
    reused once its file is gone): rename it aside (atomic), check the moved file is that one and
    delete it; anything else moved by mistake is linked back (same inode) and is never deleted.
    True if it was removed."""
    aside = path.with_name(f"{path.name}.aside.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if read_lock(aside) == (record, ident):
        aside.unlink()
        return True
    try:
        os.link(aside, path)  # put it back: its holder's descriptor still matches
        aside.unlink()
    except FileExistsError:  # a lock created meanwhile: keep both files, delete neither
        print(f"warning: {aside} is a lock moved aside by a takeover race; it was not deleted", flush=True)
    return False


# The takeover lock is held for milliseconds; one this old was left by a contender that died.
TAKEOVER_STALE_S = 60.0


def _take_over(path: Path, stale: tuple[dict, tuple[int, int]], record: dict, stale_reason) -> None:
    """Remove the stale lock ``stale`` (record, identity) at ``path``, holding ``PATH.takeover``."""
    mutex = path.with_name(path.name + ".takeover")
    try:
        fd = create_exclusive(mutex, record)
    except FileExistsError:
        holder, m_ident = read_lock(mutex)
        if m_ident is not None and stale_by_heartbeat(holder, mutex, TAKEOVER_STALE_S) is not None:
            remove_if(mutex, m_ident, holder)  # left by a contender that died mid-takeover
        time.sleep(0.05)
        return
    try:
        holder, ident = read_lock(path)
        if (holder, ident) == stale and stale_reason(holder, path) is not None:  # still that stale file
            remove_if(path, ident, holder)
    finally:
        m_ident = file_identity(os.fstat(fd))
        os.close(fd)
        remove_if(mutex, m_ident, record)


def claim_file(
    path: Path, record: dict, stale_reason: Callable[[dict, Path], str | None]
) -> tuple[int | None, dict]:
    """Create the lock file ``path`` holding ``record``, taking over a stale one (``stale_reason``
    not None): (its descriptor, record); or (None, holder) while a live holder has it. Fresh locks
    are only created where none exists, so with any number of contenders none is deleted."""
    for _ in range(20):
        try:
            return create_exclusive(path, record), record
        except FileExistsError:
            pass
        holder, ident = read_lock(path)
        if ident is None:
            continue  # released meanwhile
        if stale_reason(holder, path) is None:
            return None, holder
        _take_over(path, (holder, ident), record, stale_reason)
    return None, read_lock(path)[0] or {}


# A held lock's mtime is refreshed every LOCK_BEAT_S; one untouched for LOCK_STALE_S whose holder
# cannot be checked from here (another host or container) was left by a dead one.
LOCK_BEAT_S, LOCK_STALE_S = 30.0, 600.0


@contextlib.contextmanager
def held_lock(
    path: Path,
    record: dict,
    busy: Callable[[dict], Exception],
    wait: bool = False,
    waiting: Callable[[dict], None] | None = None,
) -> Iterator[None]:
    """Hold the ``O_EXCL`` lock file ``path`` (holding ``record``) for the block, refreshing its mtime
    every LOCK_BEAT_S through its own descriptor (never touching a lock taken after ours). A stale
    lock (its holder gone, this SLURM job requeued, or elsewhere and silent for LOCK_STALE_S:
    ``stale_by_heartbeat``) is taken over; a live one is waited for (``wait``; ``waiting(holder)``
    called once when the wait starts, to say so: it may last LOCK_STALE_S) or ``busy(holder)`` is
    raised. Released (removed only if still ours) on any exit."""
    path = Path(path)
    said = False
    while True:
        fd, holder = claim_file(path, record, lambda h, p: stale_by_heartbeat(h, p, LOCK_STALE_S))
        if fd is not None:
            break
        if not wait:
            raise busy(holder)
        if waiting is not None and not said:
            waiting(holder)
            said = True
        time.sleep(0.2)
    stop = threading.Event()

    def beat():
        while not stop.wait(LOCK_BEAT_S):
            with contextlib.suppress(OSError):
                os.utime(fd)

    beating = threading.Thread(target=beat, name=f"lock-heartbeat:{path.name}", daemon=True)
    beating.start()
    try:
        yield
    finally:
        stop.set()
        beating.join()
        remove_if(path, file_identity(os.fstat(fd)), record)
        os.close(fd)
