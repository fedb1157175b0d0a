"""The checkpoint format on disk: names, the tracker file, metadata, atomic writes.

Layout of a run directory (Megatron-LM's names, so its users find their way)::

    RUN_DIR/checkpoints/latest_checkpointed_iteration.txt     "1200"
    RUN_DIR/checkpoints/iter_0001200/                         dist_checkpointing files
        dense_model.json     iteration, resolved config, tokenizer (type and file name)
        config.yaml          the same config, for people
        tokenizer.model      a copy of the tokenizer (or tokenizer/ for Hugging Face ones)

No torch.distributed here: these read and write plain files, for the trainer, the evaluation and
the export alike.

Durability (``publish``): every file of ``iter_N.tmp`` is fsynced, the folder renamed to ``iter_N``
and ``checkpoints/`` fsynced, then the tracker is written (temporary name, fsync, rename, fsync of
the folder), and only then are older checkpoints pruned. Pruning deletes only folders *below* the
tracker's iteration (keeping ``keep_last`` including the tracker's); a folder *above* it (an older
run's after ``checkpoint.fresh=true``, a rollback, an orphan) is moved to
``checkpoints/stale/iter_N.<UTC time>`` with a message, never deleted. ``fsync_tree`` and
``fsync_dir`` are the helpers for any other writer that renames a finished folder into place.

Loading (``plan_load``): a run resumes its own latest checkpoint when it has one (unless
``checkpoint.fresh``); ``checkpoint.load`` (a run directory, its ``checkpoints/`` or one
``iter_N``) applies only while it has none, in ``checkpoint.load_mode`` ``resume`` (step,
optimizer, schedule, data position continue) or ``weights`` (the model only, from step 0). A
checkpoint whose metadata says ``"weights_only": true`` always loads as weights.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dense_model.config import Config, config_to_dict, save_config

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "dense_model.json"
CHECKPOINTS = "checkpoints"
STALE = "stale"  # checkpoints/stale/: folders above the tracker, moved aside instead of deleted


class CheckpointError(RuntimeError):
    """A checkpoint path that does not exist or is not one of ours; the message says which and why."""


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def read_latest_iteration(root: str | os.PathLike) -> int | None:
    """The iteration the tracker file points at, or None when there is no checkpoint."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} holds {text!r}, not an iteration number; delete it or fix it")
    return int(text)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory, its checkpoints/ folder or one iter_NNNNNNN folder -> that iteration's folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / METADATA).is_file():
        return path
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    latest = read_latest_iteration(root)
    if latest is None:
        raise CheckpointError(
            f"{path} is not a dense_model checkpoint: expected a run directory with {CHECKPOINTS}/{TRACKER}, "
            f"a checkpoints folder with {TRACKER}, or an iter_NNNNNNN folder with {METADATA}"
        )
    folder = iteration_dir(root, latest)
    if not (folder / METADATA).is_file():
        raise CheckpointError(
            f"{root / TRACKER} points at iteration {latest} but {folder / METADATA} is missing"
        )
    return folder


def read_metadata(folder: str | os.PathLike) -> dict:
    return json.loads((Path(folder) / METADATA).read_text())


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory: makes the entries created, renamed or deleted in it durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file under ``folder``, then every directory in it, ``folder`` included (before
    renaming a finished folder into place; then ``fsync_dir`` its parent)."""
    folder = Path(folder)
    dirs = [folder]
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        dirs.extend(Path(dirpath) / d for d in dirnames)
    for d in dirs:
        fsync_dir(d)


def fsync_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` durably: a temporary name, fsync, rename, fsync of the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_metadata(
    folder: Path, iteration: int, cfg: Config, weights_only: bool = False, record: dict | None = None
) -> None:
    """dense_model.json (iteration, resolved config, tokenizer copy, ``record``'s entries) and
    config.yaml into ``folder``. A trainer's save records ``schedule`` (the schedule in force, as
    ``training.optim.schedule_in_force`` names it) and ``schedule_history`` (each change on resume:
    step, {name: [old, new]}).

    ``weights_only``: the folder holds the model's sharded state only (dist_checkpointing, no
    optimizer, scheduler or RNG state), e.g. imported weights; it always loads as model weights,
    at step 0 (``checkpoint.load_mode`` does not apply)."""
    meta = {
        "format": "dense_model/1",
        "iteration": iteration,
        "config": config_to_dict(cfg),
        "tokenizer": _copy_tokenizer(cfg, folder),
    }
    if weights_only:
        meta["weights_only"] = True
    meta.update(record or {})
    fsync_write(folder / METADATA, json.dumps(meta, indent=2))
    save_config(cfg, folder / "config.yaml")


def publish(tmp: Path, final: Path, root: Path, iteration: int, keep_last: int | None) -> None:
    """Make a complete ``iter_N.tmp`` the latest checkpoint, in an order that survives a crash or
    a power cut at any point: fsync its files; rename it into place and fsync ``root``; move the
    tracker (write + fsync + rename + fsync); then move folders above ``iteration`` aside and prune
    those below it (``keep_last`` including this one)."""
    fsync_tree(tmp)
    if final.exists():  # a folder of this iteration from another run or an earlier attempt
        _set_aside(root, final)
    os.replace(tmp, final)
    fsync_dir(root)
    fsync_write(root / TRACKER, str(iteration))
    for newer in (f for n, f in _iteration_folders(root) if n > iteration):
        _set_aside(root, newer)
    if keep_last:
        _prune(root, iteration, keep_last)


def _copy_tokenizer(cfg: Config, folder: Path) -> dict | None:
    model_path = cfg.data.tokenizer_model
    if not model_path:
        return None
    src = Path(model_path)
    if src.is_dir():
        shutil.copytree(src, folder / "tokenizer")
        name = "tokenizer"
    else:
        name = "tokenizer" + (src.suffix or ".model")
        shutil.copy2(src, folder / name)
    return {"type": cfg.data.tokenizer_type, "file": name}


def _iteration_folders(root: Path) -> list[tuple[int, Path]]:
    """(iteration, folder) of every published ``iter_NNNNNNN`` folder in ``root``, by iteration."""
    found = []
    for p in root.glob("iter_*"):
        number = p.name[len("iter_") :]
        if p.is_dir() and number.isdigit():
            found.append((int(number), p))
    return sorted(found)


def _set_aside(root: Path, folder: Path) -> Path:
    """Move ``folder`` to ``root/stale/<name>.<UTC time>`` (never deleted), saying so."""
    stale = root / STALE
    stale.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = stale / f"{folder.name}.{stamp}"
    suffix = 1
    while target.exists():
        target = stale / f"{folder.name}.{stamp}.{suffix}"
        suffix += 1
    os.replace(folder, target)
    fsync_dir(stale)
    fsync_dir(root)
    print(
        f"checkpoint: moved {folder} aside to {target}: it is not part of this run's history "
        f"(above the tracker or replaced); delete it when it is not needed",
        flush=True,
    )
    return target


def _prune(root: Path, iteration: int, keep_last: int) -> None:
    """Delete the folders below ``iteration`` (the tracker's) but the newest ``keep_last - 1``."""
    older = [f for n, f in _iteration_folders(root) if n < iteration]
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(root)


def check_load_path(path: str | os.PathLike) -> Path:
    """``checkpoint.load`` -> the iteration folder it names (a run directory, its checkpoints/
    folder, or one iter_NNNNNNN folder), or CheckpointError (one line: the reason and the forms
    accepted; the pre-launch check prints it and exits 2)."""
    if not Path(path).exists():
        raise CheckpointError(
            f"checkpoint.load={path} does not exist; give a run directory, its {CHECKPOINTS}/ folder or "
            "one iter_NNNNNNN folder"
        )
    try:
        return resolve_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint.load={path}: {err}") from None


@dataclass
class LoadPlan:
    """What a training job loads at start: ``folder`` (None: nothing, step 0 from initialisation),
    ``mode`` ("resume": model, optimizer, scheduler, step, data position; "weights": the model
    only, step 0) and ``source`` ("own": the run's own latest; "load": checkpoint.load)."""

    folder: Path | None
    mode: str
    source: str | None
    iteration: int = 0
    note: str | None = None  # a line to print (checkpoint.load not used, fresh over checkpoints)


def plan_load(run_dir: str | os.PathLike, load: str | None, load_mode: str, fresh: bool) -> LoadPlan:
    """Decide what a job loads (no side effects; the pre-launch check and the trainer both call it).

    - The run has a checkpoint of its own and not ``fresh``: resume it; ``load`` is not used.
    - Otherwise, ``load`` set: that checkpoint, in ``load_mode``, or as weights when its metadata
      says ``weights_only``.
    - Otherwise nothing: step 0.

    CheckpointError (one line: the path, what is wrong, the forms accepted) when ``load`` does not
    resolve or the run's own tracker points at a missing checkpoint.
    """
    own_root = Path(run_dir) / CHECKPOINTS
    own = read_latest_iteration(own_root)
    if own is not None and not fresh:
        folder = resolve_checkpoint(own_root)
        note = None
        if load:
            note = (
                f"checkpoint.load={load} is not used: the run has its own checkpoint (step {own}) and "
                "resumes it; set checkpoint.fresh=true to start from checkpoint.load instead"
            )
        mode = "weights" if read_metadata(folder).get("weights_only") else "resume"
        return LoadPlan(folder, mode, "own", iteration=own, note=note)
    note = None
    if own is not None:
        note = (
            f"checkpoint.fresh=true: not resuming {own_root} (tracker at step {own}); this run's first "
            f"save moves every checkpoint above its own step to {own_root / STALE}/ and replaces the "
            "tracker; older ones are pruned by checkpoint.keep_last like this run's"
        )
    if not load:
        return LoadPlan(None, "resume", None, note=note)
    folder = check_load_path(load)
    meta = read_metadata(folder)
    mode = "weights" if meta.get("weights_only") else load_mode
    return LoadPlan(folder, mode, "load", iteration=int(meta.get("iteration", 0)), note=note)
