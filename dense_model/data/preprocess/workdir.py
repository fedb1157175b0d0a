"""The work folder `OUTPUT_PREFIX.shards/`: its lock, its manifest, the shards finished and the
outputs published so far, the merge claim."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Sequence

from dense_model.data.preprocess.config import MANIFEST_VERSION, PreprocessConfig, ResumeError
from dense_model.data.preprocess.plan import ShardSpec
from dense_model.data.preprocess.shard import shard_is_intact
from dense_model.data.tokenizers import Tokenizer


@contextlib.contextmanager
def locked(work_dir: str, wait: bool = False):
    """An exclusive lock on the work folder: held for a whole single-machine run (a second run with the
    same prefix is refused), or, with wait=True, briefly while a task of a multi-task run sets up."""
    fd = os.open(os.path.join(work_dir, "lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise ResumeError(
                f"another preprocess run is using {work_dir} (same --output-prefix); wait for it or pick "
                "another --output-prefix."
            ) from err
        yield
    finally:
        os.close(fd)


def run_settings(cfg: PreprocessConfig, tokenizer: Tokenizer, dtype: str) -> dict:
    return {
        "tokenizer_type": tokenizer.tokenizer_type,
        "tokenizer_sha256": tokenizer.fingerprint(),
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype,
        "json_keys": list(cfg.json_keys),
        "append_eod": bool(cfg.append_eod),
        "split_by_subset": bool(cfg.split_by_subset),
        "subset_from": cfg.subset_from,
    }


def prepare_work_dir(work_dir: str, settings: dict, restart: bool, log) -> dict | None:
    """Check (or reset) the work folder against these settings; returns the old manifest if reusable."""
    manifest_path = os.path.join(work_dir, "manifest.json")
    if not os.path.exists(manifest_path):
        return None
    if restart:
        log(f"--restart: discarding the shards in {work_dir}")
        return None
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except ValueError:
        manifest = {}
    old = manifest.get("settings")
    if old == settings and manifest.get("version") == MANIFEST_VERSION:
        return manifest
    diffs = [k for k in settings if (old or {}).get(k) != settings[k]] if old else ["(unreadable manifest)"]
    raise ResumeError(
        f"{work_dir} holds shards of an unfinished run with different settings ({', '.join(diffs)}). "
        "Rerun with --restart to discard them, or choose another --output-prefix."
    )


# Work-folder files that are not a shard's: kept by the clean-up of unfinished shards.
RUN_FILES = ("lock", "manifest.json", "merge.claim")
PUBLISHED = "published."  # published.HASH.json: an output merged, renamed and recorded


def is_run_file(name: str) -> bool:
    return name in RUN_FILES or name.startswith(PUBLISHED)


def reset_work_dir(work_dir: str) -> None:
    for name in os.listdir(work_dir):
        if name != "lock":
            os.remove(os.path.join(work_dir, name))


def published_outputs(work_dir: str, plan_hash: str) -> dict[tuple[str | None, str], dict]:
    """Outputs a crashed run already merged and published for this very shard plan, still intact."""
    found = {}
    for name in os.listdir(work_dir):
        if not (name.startswith(PUBLISHED) and name.endswith(".json")):
            continue
        try:
            with open(os.path.join(work_dir, name)) as f:
                record = json.load(f)
            if record["plan"] == plan_hash and all(
                os.path.getsize(record["prefix"] + ext) == record["sizes"][ext] for ext in (".bin", ".idx")
            ):
                found[(record["subset"], record["key"])] = record
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def finished_shards(work_dir: str, shards: Sequence[ShardSpec], published) -> dict[str, dict]:
    """{shard id: result} of the shards of this plan whose done.json and files are intact."""
    ids = {s.id for s in shards}
    results = {}
    for name in os.listdir(work_dir):
        sid = name.split(".", 1)[0]
        if name.endswith(".done.json") and sid in ids:
            try:
                with open(os.path.join(work_dir, name)) as f:
                    result = json.load(f)
            except ValueError:
                continue
            if shard_is_intact(work_dir, result, set(published)):
                results[sid] = result
    return results


def claim_merge(work_dir: str, cfg: PreprocessConfig) -> bool:
    """Whether this task merges: the first to create `merge.claim` (O_EXCL, atomic), or the same task
    requeued after dying mid-merge, or an explicit --merge-only."""
    path = os.path.join(work_dir, "merge.claim")
    me = "merge-only" if cfg.merge_only else f"task {cfg.task_index}"
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with open(path) as f:
            owner = f.read().strip()
        return owner == me or cfg.merge_only
    with os.fdopen(fd, "w") as f:
        f.write(me)
    return True
