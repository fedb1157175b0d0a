"""The work folder `OUTPUT_PREFIX.shards/`: its lock, its manifest, the shards finished and the
outputs published so far, the claims of the tasks and of the merge (`claims.py`)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from dense_model.data.preprocess.claims import (
    CLAIM_SUFFIX,
    ClaimError,
    describe,
    folder_lock,
    is_stale,
    read_claim,
    take,
)
from dense_model.data.preprocess.config import MANIFEST_VERSION, PreprocessConfig, ResumeError
from dense_model.data.preprocess.plan import ShardSpec, blend_path_for, output_prefix_for
from dense_model.data.preprocess.shard import shard_is_intact
from dense_model.data.tokenizers import Tokenizer


def locked(work_dir: str, wait: bool = False, say=None):
    """An exclusive lock on the work folder: held for a whole single-machine run (a second run with the
    same prefix is refused), or, with wait=True, briefly while a task of a multi-task run sets up
    (one line through `say` when the wait starts, naming the holder).
    An O_EXCL lock file naming its holder (`claims.folder_lock`), not `flock`."""
    busy = f"another preprocess run is using {work_dir} (same --output-prefix)"
    return folder_lock(os.path.join(work_dir, "lock"), busy, wait, say)


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
        # Shards made without --strict hold what --strict would have refused; and tasks of another
        # count take other shares of the same shards (two would tokenise one shard at once).
        "strict": bool(cfg.strict),
        "num_tasks": int(cfg.num_tasks),
    }


def prepare_work_dir(
    work_dir: str, settings: dict, restart: bool, log, merge_only: bool = False
) -> dict | None:
    """Check (or reset) the work folder against these settings; returns the old manifest if reusable.
    --merge-only takes the task count of the run it merges."""
    manifest_path = os.path.join(work_dir, "manifest.json")
    if not os.path.exists(manifest_path):
        foreign = sorted(n for n in os.listdir(work_dir) if not is_run_file(n) and ".tmp." not in n)
        if foreign:  # reset_work_dir would delete them: not a work folder, or not ours
            raise ResumeError(
                f"{work_dir} holds {foreign[0]} but no manifest.json: it is not a preprocess work folder; "
                "nothing was deleted: choose another --output-prefix, or move that folder away"
            )
        return None
    if restart:
        check_no_other_claims(work_dir)  # --restart deletes every task's shards
        log(f"--restart: discarding the shards in {work_dir}")
        return None
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except ValueError:
        manifest = {}
    old = manifest.get("settings")
    if merge_only and isinstance(old, dict) and "num_tasks" in old:
        settings["num_tasks"] = old["num_tasks"]
    if old == settings and manifest.get("version") == MANIFEST_VERSION:
        return manifest
    if isinstance(old, dict):
        diffs = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in settings.items() if old.get(k) != v]
    else:
        diffs = ["an unreadable manifest.json"]
    raise ResumeError(
        f"{work_dir} holds shards of an unfinished run with other settings ({'; '.join(diffs)}). "
        "Rerun with the same settings to resume, with --restart (on one machine) to discard them, or choose "
        "another --output-prefix."
    )


# Work-folder files that are not a shard's: kept by the clean-up of unfinished shards.
RUN_FILES = ("lock", "manifest.json")  # and the claims
PUBLISHED = "published."  # published.HASH.json: an output merged, renamed and recorded


def is_run_file(name: str) -> bool:
    return name in RUN_FILES or name.startswith(PUBLISHED) or name.endswith(CLAIM_SUFFIX)


def check_no_other_claims(work_dir: str) -> None:
    """ClaimError while a live process other than this one holds a claim in ``work_dir``."""
    for name in sorted(os.listdir(work_dir)):
        if name.endswith(CLAIM_SUFFIX):
            path = os.path.join(work_dir, name)
            record = read_claim(path)
            if record and not is_stale(record) and record.get("pid") != os.getpid():
                raise ClaimError(
                    "--restart would delete the shards of a run still working: "
                    + describe(name.removesuffix(CLAIM_SUFFIX), path, record)
                )


def output_names(work_dir: str, cfg: PreprocessConfig) -> set[str]:
    """The file names this prefix's merge writes next to the outputs (``PREFIX[_SUBSET]_KEY_document``
    .bin/.idx and the blends), for the subsets its finished shards and published records name: a
    merge's temporary is one of these with ``.tmp.PID`` (another prefix's ``PREFIX_v2_...`` is not)."""
    subsets: set[str | None] = {None}
    for name in os.listdir(work_dir):
        if name.endswith(".done.json") or (name.startswith(PUBLISHED) and name.endswith(".json")):
            try:
                with open(os.path.join(work_dir, name)) as f:
                    record = json.load(f)
                subsets.update(o["subset"] for o in record.get("outputs", [record]))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
    names = set()
    for key in cfg.json_keys:
        names.add(os.path.basename(blend_path_for(cfg.output_prefix, key, cfg.json_keys)))
        for subset in subsets:
            stem = os.path.basename(output_prefix_for(cfg.output_prefix, key, subset))
            names.update((stem + ".bin", stem + ".idx"))
    return names


def reset_work_dir(work_dir: str) -> None:
    """Remove every shard and record; the lock and the claims (of processes working now) stay."""
    for name in os.listdir(work_dir):
        if name != "lock" and not name.endswith(CLAIM_SUFFIX):
            os.remove(os.path.join(work_dir, name))


def task_claim_path(work_dir: str, cfg: PreprocessConfig) -> str:
    return os.path.join(work_dir, f"task.{cfg.task_index}{CLAIM_SUFFIX}")


def claim_task(work_dir: str, cfg: PreprocessConfig) -> str:
    """Claim this task index (a second instance of it, e.g. a resubmission, would delete this one's
    files); returns the claim's path. Raises ClaimError while a live process holds it."""
    path = task_claim_path(work_dir, cfg)
    what = (
        f"task {cfg.task_index} of {cfg.num_tasks}" if cfg.num_tasks > 1 else "a run of this --output-prefix"
    )
    if not take(path, what):
        thing = f"Task {cfg.task_index} of {cfg.num_tasks}" if cfg.num_tasks > 1 else "This --output-prefix"
        raise ClaimError(describe(thing, path, read_claim(path) or {}))
    return path


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


def merge_claim_path(work_dir: str) -> str:
    return os.path.join(work_dir, "merge" + CLAIM_SUFFIX)


def claim_merge(work_dir: str, cfg: PreprocessConfig) -> bool:
    """Whether this task merges: the first to create `merge.claim` (O_EXCL, atomic), or the same task
    index again (requeued after dying mid-merge: its task claim says the old one is gone), or the
    claimant is gone (`claims.is_stale`). --merge-only takes over only a stale claim: it raises
    ClaimError while the claimant may still be merging."""
    path = merge_claim_path(work_dir)
    me = "merge-only" if cfg.merge_only else f"task {cfg.task_index}"
    if take(path, me, take_over=lambda record: record.get("what") == me and not cfg.merge_only):
        return True
    if cfg.merge_only:
        raise ClaimError("--merge-only: " + describe("the merge", path, read_claim(path) or {}))
    return False
