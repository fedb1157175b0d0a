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
checkpoint whose metadata says ``"weights_only": true`` always loads as weights. ``plan_run_load``
also refuses, in one line, a checkpoint of another model shape (``check_same_model``): what the
trainer and the pre-launch check call.

Out of space (``is_disk_full``, ``disk_full_message``): a save that fails on a full disk or quota is
said in one line (the path, the space free, what a checkpoint and ``keep_last`` need, the resume
point); a run needs room for ``keep_last`` + 1 checkpoints (docs/safety.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dense_model.config import (
    Config,
    ConfigError,
    ModelConfig,
    config_from_dict,
    config_to_dict,
    expert_ffn_hidden_size,
    ffn_hidden_size,
    resolve_vocab_size,
    save_config,
)

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


def publish(
    tmp: Path, final: Path, root: Path, iteration: int, keep_last: int | None, keep_every: int | None = None
) -> None:
    """Make a complete ``iter_N.tmp`` the latest checkpoint, in an order that survives a crash or
    a power cut at any point: fsync its files; rename it into place and fsync ``root``; move the
    tracker (write + fsync + rename + fsync); then move folders above ``iteration`` aside and prune
    those below it (``keep_last`` including this one; ``keep_every``: every Nth step is kept too)."""
    fsync_tree(tmp)
    if final.exists():  # a folder of this iteration from another run or an earlier attempt
        _set_aside(root, final)
    os.replace(tmp, final)
    fsync_dir(root)
    fsync_write(root / TRACKER, str(iteration))
    for newer in (f for n, f in _iteration_folders(root) if n > iteration):
        _set_aside(root, newer)
    if keep_last:
        _prune(root, iteration, keep_last, keep_every)


# A save that fails with this little space left on its filesystem failed for want of space (some
# writers, torch.save's zip writer among them, lose the ENOSPC and say "unexpected pos ...").
LOW_SPACE = 1 << 20
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(err: BaseException, path: str | os.PathLike) -> bool:
    """Whether ``err`` (from a save under ``path``) is a full disk or quota: an ENOSPC/EDQUOT in its
    chain (or in a torch.distributed.checkpoint failure of any rank), or under LOW_SPACE free."""
    seen, stack = set(), [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if getattr(e, "errno", None) in _FULL_ERRNOS or any(os.strerror(n) in str(e) for n in _FULL_ERRNOS):
            return True
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # CheckpointException: {rank: (exception, trace)}
        if isinstance(failures, dict):
            stack += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    try:
        return shutil.disk_usage(path).free < LOW_SPACE
    except OSError:
        return False


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes in the files under ``folder`` (0 if it is gone)."""
    total = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def disk_full_message(root: Path, iteration: int, keep_last: int | None, partial_bytes: int) -> str:
    """One line for a save that ran out of space (its partial folder removed): where, the space
    free now, what a checkpoint takes and what keep_last needs, which checkpoint is the resume point."""
    usage = shutil.disk_usage(root)
    latest = read_latest_iteration(root)
    if latest is not None and iteration_dir(root, latest).is_dir():
        size = folder_bytes(iteration_dir(root, latest))
        each = f"a checkpoint takes {_size(size)} (step {latest}'s)"
        resume = f"the step-{latest} checkpoint is still the resume point"
    else:
        size = partial_bytes
        each = f"a checkpoint takes more than the {_size(size)} written before the disk filled"
        resume = "there is no earlier checkpoint: a relaunch starts at step 0"
    if keep_last:
        need = (
            f"checkpoint.keep_last={keep_last} needs room for {keep_last + 1} checkpoints "
            f"({keep_last} kept and the one being written: {_size((keep_last + 1) * size)}"
            f"{' or more' if latest is None else ''})"
        )
    else:
        need = "checkpoint.keep_last is unset: every checkpoint is kept, so each save needs room for one more"
    return (
        f"checkpoint of step {iteration} not saved: no space left on the filesystem of {root} "
        f"({_size(usage.free)} free of {_size(usage.total)}, the partial save removed); {each} and {need}; "
        f"{resume}. Free space there or lower checkpoint.keep_last, then relaunch"
    )


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


def _prune(root: Path, iteration: int, keep_last: int, keep_every: int | None = None) -> None:
    """Delete the folders below ``iteration`` (the tracker's) but the newest ``keep_last - 1`` and,
    with ``keep_every`` N, those of a step that is a multiple of N (a run's history, scored later)."""
    older = [(n, f) for n, f in _iteration_folders(root) if n < iteration]
    for n, old in older[: max(0, len(older) - (keep_last - 1))]:
        if keep_every and n % keep_every == 0:
            continue
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


# What fixes a model's parameters and what they compute: it cannot change in the middle of a run
# (parallel layout, fusions, dropout and the like can). Widths are compared as derived.
_MODEL_IDENTITY = {
    "model.num_layers": lambda m: m.num_layers,
    "model.hidden_size": lambda m: m.hidden_size,
    "model.num_attention_heads": lambda m: m.num_attention_heads,
    "model.num_query_groups": lambda m: m.num_query_groups or m.num_attention_heads,
    "model.activation": lambda m: m.activation,
    "model.activation_kwargs": lambda m: m.activation_kwargs,
    "model.untie_embeddings": lambda m: m.untie_embeddings,
    "model.vocab_size": lambda m: m.vocab_size,
    "model.moe.num_experts": lambda m: m.moe.num_experts or 0,
    "model.moe.shared_expert_ffn_hidden_size": lambda m: m.moe.shared_expert_ffn_hidden_size,
    "model.moe.activation_params": lambda m: m.moe.activation_params if m.moe.num_experts else None,
}
_WIDTHS = {  # derived from the activation: compared when both models have the same one
    "model.ffn_hidden_size": ffn_hidden_size,
    "model.moe.ffn_hidden_size": lambda m: expert_ffn_hidden_size(m) if m.moe.num_experts else None,
}


def model_changes(saved: ModelConfig, model: ModelConfig) -> dict[str, list]:
    """{field: [checkpoint's, config's]} for each value of the model's identity that differs."""
    getters = dict(_MODEL_IDENTITY, **(_WIDTHS if saved.activation == model.activation else {}))
    pairs = {name: [get(saved), get(model)] for name, get in getters.items()}
    return {name: pair for name, pair in pairs.items() if pair[0] != pair[1]}


def check_same_model(folder: Path, cfg: Config) -> None:
    """CheckpointError (one line: the fields, the checkpoint's and the config's values, the fix)
    when the checkpoint in ``folder`` holds another model than ``cfg`` builds. ``cfg``'s
    vocabulary is resolved as the trainer resolves it (the tokenizer's when unset)."""
    try:
        saved = config_from_dict(read_metadata(folder)["config"]).model
    except (ConfigError, KeyError, TypeError):
        return  # not a config this version reads: the load itself says what is wrong
    model = cfg.model
    if model.vocab_size is None:
        model = dataclasses.replace(model, vocab_size=resolve_vocab_size(cfg))
    changes = model_changes(saved, model)
    if changes:
        theirs = ", ".join(f"{name}={old}" for name, (old, _) in changes.items())
        ours = ", ".join(f"{name}={new}" for name, (_, new) in changes.items())
        raise CheckpointError(
            f"{folder} holds a model with {theirs}, this config asks for {ours}: a model cannot change "
            f"shape in the middle of a run; set {theirs} to continue from it, or train the new model "
            "in another run_dir (or with checkpoint.fresh=true and no checkpoint.load)"
        )


def plan_run_load(cfg: Config) -> LoadPlan:
    """``plan_load`` for a job's config, and ``check_same_model`` on what it would load: what the
    pre-launch check and the trainer call (CheckpointError: one line, exit 2 before launch)."""
    c = cfg.checkpoint
    plan = plan_load(cfg.run_dir, c.load, c.load_mode, c.fresh)
    if plan.folder is not None:
        check_same_model(plan.folder, cfg)
    return plan
