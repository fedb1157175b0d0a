"""Who works on a run: one claim per task index (`task.I.claim`) and one for the merge (`merge.claim`)
in the work folder, each created with O_EXCL and naming its owner (host, pid, the process's start
time, the SLURM job); the temporaries their dead owners left; and durable small JSON files.

A claim is stale when its owner is gone: on this host, its pid is dead or now another process (the
start time differs); anywhere, when this process is the same SLURM job and array task (a requeue:
SLURM stopped the old one). A claim from another host whose owner cannot be checked from here is
live: a second instance is refused with a line saying who holds it and how to clear it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time

from dense_model.data.indexed import publish, tmp_name
from dense_model.data.preprocess.config import ResumeError
from dense_model.procutil import process_start_time

CLAIM_SUFFIX = ".claim"
_TEMPORARY = re.compile(r"\.tmp\.(\d+)$")  # indexed.tmp_name: PATH.tmp.PID


class ClaimError(ResumeError):
    """Another live process holds the claim this one needs."""


def write_json(path: str, obj, durable: bool = True) -> None:
    """Write `path` under a temporary name, fsync it (durable), rename it, fsync the folder."""
    tmp = tmp_name(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    publish([(tmp, path)], durable=durable)


def process_start(pid: int) -> float | None:
    """The start time of process `pid`; None if it is gone or a zombie (see procutil)."""
    return process_start_time(pid)


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this host (a zombie does not)."""
    return process_start_time(pid) is not None


def _job() -> str | None:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    return f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}" if job else None


def owner(what: str) -> dict:
    pid = os.getpid()
    return {"what": what, "host": socket.gethostname(), "pid": pid, "start": process_start(pid), "job": _job(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip


def read_claim(path: str) -> dict | None:
    """The claim's owner record; {} for an unreadable one (a writer killed mid-write); None if absent."""
    try:
        with open(path) as f:
            record = json.load(f)
        return record if isinstance(record, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def is_stale(record: dict) -> bool:
    if not record.get("pid"):
        return True  # unreadable: its writer died between the create and the write
    me = owner("")
    if record.get("host") == me["host"]:
        started = process_start(record["pid"])  # NaN: another user's live process
        return record["pid"] != me["pid"] and started == started and started != record.get("start")
    return record.get("job") is not None and record.get("job") == me["job"]


def describe(thing: str, path: str, record: dict) -> str:
    """One line: who holds the claim at `path` on `thing`, and how to clear it if stale."""
    return (
        f"{thing} is claimed by {record.get('what', '?')}, pid {record.get('pid')} on {record.get('host')} "
        f"since {record.get('since')} ({path}): wait for it to end, or if that process is gone, delete "
        f"{path} and rerun."
    )


def take(path: str, what: str, take_over=lambda record: False) -> bool:
    """Create the claim at `path` for this process. An existing one is taken over if stale or if
    `take_over(record)`; else False. Call it under the work folder's lock (two takers of a stale
    claim would otherwise delete each other's)."""
    mine = owner(what)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            record = read_claim(path)
            if record is not None and not (is_stale(record) or take_over(record)):
                return False
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
            f.flush()
            os.fsync(f.fileno())
        return True
    return False


def release(path: str) -> None:
    """Remove the claim at `path` if this process holds it."""
    record = read_claim(path)
    if record and record.get("pid") == os.getpid() and record.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def live_claim_pids(work_dir: str) -> set[int]:
    """The pids of the claims in `work_dir` whose owners may still run."""
    pids = set()
    for name in os.listdir(work_dir):
        if name.endswith(CLAIM_SUFFIX):
            record = read_claim(os.path.join(work_dir, name))
            if record and not is_stale(record):
                pids.add(int(record["pid"]))
    return pids


def temporary_pid(name: str) -> int | None:
    """The pid in a temporary's name (`X.tmp.PID`), None if `name` is not one."""
    m = _TEMPORARY.search(name)
    return int(m.group(1)) if m else None


def remove_stale_temporaries(work_dir: str, output_prefix: str, say, outputs=None) -> int:
    """Remove the temporaries a dead run of this prefix left, those of no live claim's process: in the
    work folder, of the manifest and the published records (a shard's are its task's to remove: a
    worker's pid is no claim's); next to the outputs (`PREFIX_*.tmp.PID`: an interrupted merge, up to
    a whole output), also only if that pid is dead on this host; with `outputs` (file names), only
    those names' temporaries (another prefix's `PREFIX_v2_*` is not this prefix's). Returns how many."""
    live = live_claim_pids(work_dir)
    removed = 0
    folder, base = os.path.split(os.path.abspath(output_prefix))
    places = [(work_dir, ("manifest.json.tmp.", "published."), False), (folder, (base + "_",), True)]
    for place, starts, check_host in places:
        for name in os.listdir(place):
            pid = temporary_pid(name)
            if pid is None or not name.startswith(starts) or pid in live or (check_host and pid_alive(pid)):
                continue
            if check_host and outputs is not None and name.rsplit(".tmp.", 1)[0] not in outputs:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(place, name))
            removed += 1
            if place == folder:
                say(
                    f"preprocess: removed {os.path.join(place, name)}, left by an interrupted run (pid {pid})"
                )
    return removed
