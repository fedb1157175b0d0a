"""Process lifetime helpers shared by the trainer and the data toolkit.

``die_with_parent(parent_pid)`` asks Linux to SIGKILL this process when its parent dies
(``PR_SET_PDEATHSIG``), so a worker never outlives the process that watches it (a torchrun agent
killed with SIGKILL, a preprocessing run killed midway), and tells whether the parent already died
before the request took effect.
"""

from __future__ import annotations

import ctypes
import os
import signal

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
    misses them."""
    import psutil  # only the tools that kill jobs need it

    root = psutil.Process(pid)
    tree = root.children(recursive=True) + [root]
    for proc in tree:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=timeout)
