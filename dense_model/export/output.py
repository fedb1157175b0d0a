"""Where an export writes: never over its source, one export per output, published atomically.

All of it is ``dense_model.fsreplace`` (the one way a user-named folder is replaced):

- The output may not be, contain or lie inside the checkpoint's run directory, the checkpoint
  folder or the path given for it, compared by identity (device and inode, along both ancestor
  chains), so ``export_hf.py RUN RUN --overwrite`` cannot delete the run, whether ``RUN`` is reached
  through a symlink, a bind mount or ``..``, or ``RUN/checkpoints`` is a symlink.
- An output holding a run (a checkpoint tracker, ``metrics.jsonl``), a lock or a claim is refused.
- ``PARENT/.OUTPUT.lock`` keeps a second export (or an import) to the same output out.
- Files are written into ``.OUTPUT.tmp-*`` next to the output, fsynced, and renamed in;
  ``overwrite`` renames the old output to ``.OUTPUT.old`` first and deletes it only after the new one
  is in place. An export killed between the two renames left the old output aside: the next export
  (or import) to that output puts it back; temporaries of dead exports are removed.

    check_outside_run(given, folder, output)     # OutputError
    with staged_output(output, overwrite) as tmp:
        ... write files into tmp ...             # published at the end, removed on error
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from dense_model.checkpoint.layout import CHECKPOINTS
from dense_model.fsreplace import ReplaceError, relation, replacing


class OutputError(RuntimeError):
    """The output folder cannot be written as asked; the message says why (exit 2 in the CLI)."""


def run_directory(folder: Path) -> Path:
    """The run directory an ``iter_NNNNNNN`` checkpoint folder belongs to (symlinks resolved)."""
    root = Path(folder).resolve().parent
    return root.parent if root.name == CHECKPOINTS else root


def _sources(given: Path, folder: Path) -> list[Path]:
    """Every folder the export reads from or that holds it: the path given, the iteration folder,
    and the run directory both as named (``RUN/checkpoints`` may be a symlink) and resolved."""
    named = Path(os.path.abspath(folder)).parent
    named = named.parent if named.name == CHECKPOINTS else named
    return [run_directory(folder), named, Path(given), Path(folder)]


def check_outside_run(given: Path, folder: Path, output: Path) -> None:
    """Refuse an output that is, contains or lies inside the checkpoint's run directory (``given``:
    the path as the user gave it, ``folder``: the iteration folder it resolved to)."""
    for source in _sources(given, folder):
        rel = relation(output, source)
        if rel is not None:
            raise OutputError(
                f"output folder {output} {rel} the checkpoint's run directory {source}; "
                f"exporting there could delete the run: pick an output folder outside it"
            )


@contextlib.contextmanager
def staged_output(output: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """A fresh folder to write the export into, published as ``output`` when the block succeeds."""
    try:
        with replacing(output, what="export", overwrite=overwrite, kind="an export") as tmp:
            yield tmp
    except ReplaceError as err:
        raise OutputError(str(err)) from None
