"""Replacing or deleting a folder the user named: the one way every tool does it.

Used by the Hugging Face export and import (``OUT`` replaced with ``--overwrite``) and by
preprocessing's ``--restart``. Four rules:

- **Identity, never names.** Two paths are one folder when their ``(st_dev, st_ino)`` agree; whether
  one lies inside the other is read from the identities of every folder above each, walking the
  physical parent (``..`` opened from the folder itself), so symlinks, bind mounts, ``a/../a``,
  trailing slashes and case-insensitive names all come out right (``relation``).
- **Never someone else's kind of output.** A target holding a run directory (a checkpoint tracker,
  ``metrics.jsonl``, a ``job.lock``), a lock or a claim anywhere below it is refused unless the
  caller recognises the target as its own kind of output (``ours``: e.g. the import's marker with
  nothing trained since) (``check_replaceable``).
- **Check and claim before deleting.** ``replacing`` takes ``PARENT/.NAME.lock`` (an ``O_EXCL``
  file naming its holder, taken over once its holder is gone: ``procutil.held_lock``), checks, stages the new folder next to the target, checks again, then
  renames: target -> ``.NAME.old``, staging -> target, ``.NAME.old`` deleted last.
- **Crash at any point, the rerun restores or finishes.** Under the lock, first: a ``.NAME.old`` with
  no target is renamed back (killed between the two renames); with the target there it is deleted
  (killed while deleting it); staging folders ``.NAME.tmp-*`` are dead and removed. Temporaries are
  matched by their exact names (an output ``hf[12]`` never touches ``hf1``'s).

Published folders get the umask's permissions (others of a shared project can read them).

    with replacing(out, what="import", overwrite=True, ours=is_my_import, apart=[(hf_dir, "HF_DIR")]) as tmp:
        ... write into tmp ...      # published as ``out`` when the block succeeds, removed otherwise
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from dense_model.procutil import held_lock, holder_identity

# What marks a folder as someone's work in progress or a training run. The names are those of
# checkpoint/layout.py (TRACKER) and training/run_lock.py (job.lock): this floor cannot import them,
# tests/test_fsreplace.py checks they agree.
TRACKER = "latest_checkpointed_iteration.txt"
PRECIOUS_FILES = {
    TRACKER: "a checkpoint tracker",
    "metrics.jsonl": "a training run's metrics",
    "job.lock": "a run directory's lock",
}
PRECIOUS_SUFFIXES = {".lock": "a lock", ".claim": "a claim"}
OLD, STAGING = "old", "tmp-"
# Names earlier versions gave the folder set aside (export: .NAME.old-XXXXXXXX, import:
# .NAME.replaced-XXXXXXXX) and the staging folders (.NAME.tmp-export-*, .NAME.import-*).
_LEGACY_OLD = r"(?:old-[a-z0-9_]{8}|replaced-[0-9a-f]{8})"
_LEGACY_STAGING = r"(?:tmp-export-[a-z0-9_]{8}|import-[0-9a-f]{8})"


class ReplaceError(RuntimeError):
    """The folder cannot be replaced or deleted as asked; the message names it and the fix."""


class TargetBusy(ReplaceError):
    """Another live process holds the target's lock; ``holder`` is its lock record."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


# ------------------------------------------------------------------------------------------
# Identity


def identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """(st_dev, st_ino) of what ``path`` names (symlinks followed); None if nothing is there."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path.rstrip(os.sep)) or "."
        if parent == path:
            break
        path = parent
    return path


def ancestry(path: str | os.PathLike) -> list[tuple[int, int]]:
    """The identities of ``path`` (or, if it does not exist, of its nearest existing ancestor) and
    of every folder above it up to the root, climbing the physical ``..`` (not the name)."""
    start = _nearest_existing(os.fspath(path))
    ids = []
    if not os.path.isdir(start):  # a file: itself, then its folder
        ids.append(identity(start))
        start = os.path.dirname(os.path.abspath(start))
    flags = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY
    fd = os.open(start, flags)
    try:
        while True:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            if ids and ids[-1] == key:  # the root is its own parent
                return ids
            ids.append(key)
            up = os.open("..", flags, dir_fd=fd)
            os.close(fd)
            fd = up
    finally:
        os.close(fd)


def relation(a: str | os.PathLike, b: str | os.PathLike) -> str | None:
    """ "is" when ``a`` and ``b`` are one folder, "lies inside" when ``a`` is below ``b``,
    "contains" when ``b`` is below ``a``; None when neither. A path that does not exist yet lies
    inside everything its nearest existing ancestor lies inside (that ancestor included)."""
    a_is, b_is = os.path.exists(a), os.path.exists(b)
    ia, ib = ancestry(a), ancestry(b)
    if b_is and ib[0] in ia:
        return "is" if a_is and ia[0] == ib[0] else "lies inside"
    if a_is and ia[0] in ib:
        return "contains"
    return None


# ------------------------------------------------------------------------------------------
# What may be replaced


def precious_below(target: Path) -> tuple[str, str] | None:
    """(relative path, what it is) of the first run-directory file, lock or claim under ``target``
    (symlinks not followed: deleting a link never deletes what it points to); None if none."""
    for dirpath, dirnames, filenames in os.walk(target):
        dirnames.sort()
        for name in sorted(filenames):
            what = PRECIOUS_FILES.get(name) or next(
                (w for suffix, w in PRECIOUS_SUFFIXES.items() if name.endswith(suffix)), None
            )
            if what:
                return os.path.relpath(os.path.join(dirpath, name), target), what
    return None


def check_replaceable(target: Path, label: str, kind: str, ours: Callable[[Path], bool] | None) -> None:
    """ReplaceError unless ``target`` (an existing folder) holds nothing of a run, a lock or a
    claim, or ``ours(target)`` recognises it as this kind's own output."""
    if ours is not None and ours(target):
        return
    found = precious_below(target)
    if found:
        rel, what = found
        raise ReplaceError(
            f"{label} {target} holds {what} ({rel}), so it is not {kind}: nothing was deleted; "
            f"pick another folder, or remove {target} yourself if it is no longer needed"
        )


# ------------------------------------------------------------------------------------------
# The replacement


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (before it is renamed into place)."""
    for dirpath, _dirs, filenames in os.walk(folder, topdown=False):
        for name in [*filenames, "."]:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _leftovers(target: Path) -> tuple[list[Path], list[Path]]:
    """(folders set aside, staging folders) of ``target`` by their exact names."""
    name = re.escape(target.name)
    old = re.compile(rf"\.{name}\.(?:{OLD}|{_LEGACY_OLD})")
    staging = re.compile(rf"\.{name}\.(?:{STAGING}[0-9a-f]{{32}}|{_LEGACY_STAGING})")
    olds, stagings = [], []
    for entry in os.listdir(target.parent):
        if old.fullmatch(entry):
            olds.append(target.parent / entry)
        elif staging.fullmatch(entry):
            stagings.append(target.parent / entry)
    return sorted(olds, key=lambda p: p.lstat().st_ctime), stagings


def recover(target: Path, say: Callable[[str], None] | None = None) -> None:
    """Finish or undo what a killed replacement of ``target`` left (call under its lock)."""
    olds, stagings = _leftovers(target)
    if olds and not os.path.lexists(target):
        back = olds.pop()  # killed between the two renames: the old folder comes back
        os.rename(back, target)
        _fsync_dir(target.parent)
        if say:
            say(f"{target} was left aside by a replacement that was killed midway; restored it")
    for path in [*olds, *stagings]:  # the new folder is in place: these are done with
        shutil.rmtree(path)


def target_lock(target: Path, what: str, label: str) -> contextlib.AbstractContextManager[None]:
    """Hold ``PARENT/.NAME.lock``: an ``O_EXCL`` file naming its holder, with a heartbeat
    (``procutil.held_lock``; not ``flock``, which some NFS mounts grant to everyone). A dead
    holder's lock is taken over; a live one's is refused naming it."""

    def busy(holder: dict) -> TargetBusy:
        return TargetBusy(
            f"{label} {target} is being written by another {holder.get('what', 'process')} (host "
            f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('since', '?')}); "
            "wait for it or pick another folder",
            holder,
        )

    record = {"what": what, **holder_identity(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    return held_lock(target.parent / f".{target.name}.lock", record, busy)


def _name(target: str | os.PathLike) -> Path:
    """``target`` with a last component that names it (``a/..``, ``a/.`` or ``/`` resolved)."""
    target = Path(target)
    return target.resolve() if target.name in ("", ".", "..") else target


@contextlib.contextmanager
def replacing(
    target: str | os.PathLike,
    *,
    what: str,
    overwrite: bool,
    label: str = "output folder",
    kind: str | None = None,
    ours: Callable[[Path], bool] | None = None,
    apart: Iterable[tuple[str | os.PathLike, str, tuple[str, ...]]] = (),
    say: Callable[[str], None] | None = None,
) -> Iterator[Path]:
    """A fresh folder next to ``target`` to write into, published as ``target`` when the block ends
    without an error (``target``'s previous contents deleted last), removed otherwise.

    ``what``: who writes ("export", "import"); ``label``: how messages name the target;
    ``kind``: what ``ours`` recognises ("an earlier import"); ``apart``: (path, its name,
    relations refused) — e.g. ``(run, "the run directory", ("is", "contains", "lies inside"))``."""
    target = _name(target)
    kind = kind or f"an earlier {what}'s output"
    if target.is_symlink():
        raise ReplaceError(
            f"{label} {target} is a symbolic link (to {os.readlink(target)}); name the folder itself"
        )
    for path, their_name, refused in apart:
        rel = relation(target, path)
        if rel in refused:
            raise ReplaceError(
                f"{label} {target} {rel} {their_name} {path}; writing there could delete it: "
                f"pick another {label}, outside it"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    with target_lock(target, what, label):
        recover(target, say)

        def check() -> None:
            if not os.path.lexists(target):
                return
            if not target.is_dir():
                raise ReplaceError(f"{label} {target} exists and is not a folder; remove it or pick another")
            if any(target.iterdir()):
                if not overwrite:
                    raise ReplaceError(
                        f"{label} {target} exists and is not empty; remove it or pass --overwrite"
                    )
                check_replaceable(target, label, kind, ours)

        check()
        staging = target.parent / f".{target.name}.{STAGING}{uuid.uuid4().hex}"
        staging.mkdir()  # with the umask's permissions, as the files the caller writes
        try:
            yield staging
            _fsync_tree(staging)
            check()  # again: something may have started in the target while we wrote
            old = target.parent / f".{target.name}.{OLD}"
            if os.path.lexists(target):
                os.rename(target, old)
            os.rename(staging, target)
            _fsync_dir(target.parent)
            if os.path.lexists(old):
                shutil.rmtree(old)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # after an error; gone already after success
