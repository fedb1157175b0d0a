"""Who works on a run: one claim per task index (`task.I.claim`) and one for the merge (`merge.claim`)
in the work folder, each created with O_EXCL and naming its owner (`procutil.holder_identity`: host,
boot id, pid namespace, pid, the process's start time, the SLURM job and its restart count); the
temporaries their dead owners left; and durable small JSON files.

A claim is stale when its owner is gone: where its pid can be judged (same host, boot and pid
namespace), its pid is dead or now another process (the start time differs); anywhere, when this
process is the same SLURM job restarted (a requeue: SLURM stopped the old one; `procutil.requeued`).
A claim whose owner cannot be checked from here (another host, or a container with its own pid
namespace under the same hostname) is live: a second instance is refused with a line saying who
holds it and how to clear it. Claims written before these fields existed (no `slurm_job`) are judged by
host and pid, and as a requeue when they name this SLURM job and array task (`job`), as they were."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from dense_model.data.indexed import publish, tmp_name
from dense_model.data.preprocess.config import ResumeError
from dense_model.procutil import (
    ELSEWHERE,
    GONE,
    LOCK_STALE_S,
    held_lock,
    holder_identity,
    holder_state,
    is_this_process,
    process_start_time,
    requeued,
)

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


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this host (a zombie does not)."""
    return process_start_time(pid) is not None


def _job() -> str | None:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    return f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}" if job else None


def owner(what: str) -> dict:
    me = holder_identity()
    # `start` and `job` as the previous version wrote them, which it still reads (an upgrade mid-run)
    return {"what": what, **me, "start": me["pid_started"], "job": _job(),
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
    if "slurm_job" not in record:  # written by the previous version: its start time under `start`
        record = {**record, "pid_started": record.get("start")}
    state, _ = holder_state(record)
    if state != ELSEWHERE:
        return state == GONE
    if "slurm_job" not in record:  # the previous version's rule: the same SLURM job and array task
        return record.get("job") is not None and record.get("job") == _job()
    return requeued(record) is not None


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
    if record and is_this_process(record):
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


def folder_lock(path: str, busy: str, wait: bool, say: Callable[[str], None] | None = None):
    """Hold the lock file `path` (O_EXCL: `flock` is unreliable on NFS; `procutil.held_lock`): taken
    over when its holder is gone, is this SLURM job requeued, or elsewhere and silent for
    LOCK_STALE_S; else wait for it (saying so once through `say`: the holder, and how long a silent
    one elsewhere is waited for), or raise ClaimError: `busy`, the holder and how to clear it."""

    def waiting(holder: dict) -> None:
        if say is not None:
            say(
                f"waiting for {path} (held by pid {holder.get('pid')} on {holder.get('host')} since "
                f"{holder.get('since')}); a holder gone from this host is taken over at once, one on "
                f"another host or container once its heartbeat is {LOCK_STALE_S / 60:g} min old"
            )

    def refused(holder: dict) -> ClaimError:
        return ClaimError(
            f"{busy} ({path} is held by pid {holder.get('pid')} on {holder.get('host')} since "
            f"{holder.get('since')}); wait for it or pick another --output-prefix, or if that "
            f"process is gone, delete {path} and rerun."
        )

    return held_lock(Path(path), owner("the work folder's lock"), refused, wait, waiting)
