"""Where an export writes: never over its source, one export per output, published atomically.

- The output may not be, contain or lie inside the checkpoint's run directory (symlinks and ``..``
  resolved), so ``export_hf.py RUN RUN --overwrite`` cannot delete the run.
- ``OUTPUT.export.lock`` (``O_EXCL`` with host/pid, as the run directory's ``job.lock``; a dead
  export's lock is taken over) keeps a second export to the same output out.
- Files are written into a folder of their own (``tempfile.mkdtemp`` next to the output), fsynced,
  and renamed in; ``overwrite`` renames the old output aside first and deletes it only after the
  new one is in place. An export killed between the two renames left the old output aside: the next
  export to that output (under the lock) puts it back; temporaries of dead exports are removed.

    check_outside_run(folder, output)            # ExportError
    with staged_output(output, overwrite) as tmp:
        ... write files into tmp ...             # published at the end, removed on error
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from dense_model.checkpoint.layout import CHECKPOINTS, fsync_dir, fsync_tree
from dense_model.training.run_lock import RunDirBusy, RunDirClaim


class OutputError(RuntimeError):
    """The output folder cannot be written as asked; the message says why (exit 2 in the CLI)."""


def run_directory(folder: Path) -> Path:
    """The run directory an ``iter_NNNNNNN`` checkpoint folder belongs to (symlinks resolved)."""
    root = Path(folder).resolve().parent
    return root.parent if root.name == CHECKPOINTS else root


def check_outside_run(folder: Path, output: Path) -> None:
    """Refuse an output that is, contains or lies inside the run directory of ``folder``."""
    run, out = run_directory(folder), Path(output).resolve()
    if out == run or out in run.parents or run in out.parents:
        relation = "is" if out == run else ("contains" if out in run.parents else "lies inside")
        raise OutputError(
            f"output folder {output} {relation} the checkpoint's run directory {run}; exporting there "
            f"could delete the run: pick an output folder outside it"
        )


def _busy(output: Path):
    def message(holder: dict) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        return (
            f"output folder {output} is being written by another export (host {holder.get('host', '?')}, "
            f"pid {holder.get('pid', '?')}, since {since}); wait for it or pick another output folder"
        )

    return message


def _recover(output: Path) -> None:
    """Undo what a killed export left (under the output's lock, so no export is running)."""
    parent, name = output.parent, output.name
    for old in sorted(parent.glob(f".{name}.old-*")):
        if not output.exists():
            os.rename(old, output)  # killed between the two renames: the old output comes back
        else:
            shutil.rmtree(old)
    for tmp in parent.glob(f".{name}.tmp-export-*"):
        shutil.rmtree(tmp)


@contextlib.contextmanager
def staged_output(output: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """A fresh folder to write the export into, published as ``output`` when the block succeeds."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = RunDirClaim.acquire_file(output.with_name(output.name + ".export.lock"), _busy(output))
    except RunDirBusy as err:
        raise OutputError(str(err)) from None
    try:
        _recover(output)
        if output.exists() and any(output.iterdir()) and not overwrite:
            raise OutputError(
                f"output folder {output} exists and is not empty; remove it or pass --overwrite"
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-export-", dir=output.parent))
        try:
            yield tmp
            fsync_tree(tmp)
            old = None
            if output.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
                os.rename(output, old)  # replaces the empty placeholder folder
            os.rename(tmp, output)
            fsync_dir(output.parent)
            if old is not None:
                shutil.rmtree(old)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # after an error; gone already after success
    finally:
        lock.release()
