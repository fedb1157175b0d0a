"""The merge: each output concatenated from its shards in plan order, published, recorded, then its
shards deleted; several outputs at once in threads; then the blend files."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from dense_model.data.blend import write_blend
from dense_model.data.indexed import merge_datasets
from dense_model.data.jsonl import BadLineStats
from dense_model.data.preprocess.claims import write_json
from dense_model.data.preprocess.config import MB, NoDocumentsError, OutputInfo, PreprocessConfig
from dense_model.data.preprocess.plan import ShardSpec, blend_path_for, output_prefix_for
from dense_model.data.preprocess.workdir import PUBLISHED


@dataclass
class MergeJob:
    subset: str | None
    key: str
    prefix: str
    stems: list[str]
    nbytes: int  # token bytes to copy


def merge_one(
    job: MergeJob, work_dir: str, plan_hash: str, cfg: PreprocessConfig, on_copied: Callable[[int], None]
) -> None:
    """Merge one output, publish it, record it as published (fsynced), then delete its shard files:
    in this order, so that a crash at any point leaves either the shards or a published output."""
    merge_datasets(job.stems, job.prefix, on_copied)  # written, fsynced, renamed, folder fsynced
    record = {
        "subset": job.subset,
        "key": job.key,
        "prefix": job.prefix,
        "plan": plan_hash,
        "sizes": {ext: os.path.getsize(job.prefix + ext) for ext in (".bin", ".idx")},
    }
    if record["sizes"][".bin"] != job.nbytes:
        raise RuntimeError(
            f"{job.prefix}.bin has {record['sizes']['.bin']:,} bytes, its shards {job.nbytes:,}: the merge "
            "lost data (disk full?); its shards are kept, rerun the same command to merge again."
        )
    marker = os.path.join(work_dir, PUBLISHED + hashlib.sha1(job.prefix.encode()).hexdigest()[:16] + ".json")
    write_json(marker, record)
    if not cfg.keep_shards:  # the output is safe: its shards' tokens are no longer needed on disk
        for stem in job.stems:
            for ext in (".bin", ".idx"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(stem + ext)
    if cfg.batch_delay:
        time.sleep(cfg.batch_delay)


def outputs_of(
    shards: Sequence[ShardSpec], results: dict[str, dict], work_dir: str
) -> tuple[dict[tuple[str | None, str], dict], BadLineStats, int]:
    """What the finished `shards` wrote, per output (subset, key): their datasets in plan order
    ("stems"), documents and tokens; and their bad-line statistics (line numbers made absolute by
    counting the lines of a file's earlier shards) and line count."""
    bad = BadLineStats()
    lines = 0
    lines_before: dict[str, int] = {}
    per_output: dict[tuple[str | None, str], dict] = {}
    for spec in shards:
        result = results[spec.id]
        stats = BadLineStats.from_json(result["bad"])
        stats.shift_lines(lines_before.get(spec.path, 0))
        lines_before[spec.path] = lines_before.get(spec.path, 0) + result["lines"]
        bad.merge(stats)
        lines += result["lines"]
        for out in result["outputs"]:
            entry = per_output.setdefault(
                (out["subset"], out["key"]), {"stems": [], "documents": 0, "tokens": 0}
            )
            entry["stems"].append(os.path.join(work_dir, out["stem"]))
            entry["documents"] += out["documents"]
            entry["tokens"] += out["tokens"]
    return per_output, bad, lines


class MergeCancelled(Exception):
    """The run was interrupted: a merge stops, its temporaries removed (see `merge_datasets`)."""


class Merger:
    """Merges outputs in a thread pool, several at once, largest first among those handed in together.
    With --subset-from layout, subsets are handed in while other shards are still being tokenised.
    Logs each output published, and the bytes merged so far every `log_interval` seconds (one output
    can take an hour at full scale)."""

    def __init__(self, cfg: PreprocessConfig, work_dir: str, plan_hash: str, itemsize: int, say) -> None:
        self.cfg, self.work_dir, self.plan_hash, self.say = cfg, work_dir, plan_hash, say
        self.itemsize = itemsize  # bytes per token
        self.pool: ThreadPoolExecutor | None = None
        self.futures: list = []
        self.handed_in: set[tuple[str | None, str]] = set()
        self.ready = self.copied = 0  # token bytes handed in so far, and merged
        self.lock = threading.Lock()
        self.t0 = self.last_log = 0.0
        self.cancelled = threading.Event()

    def submit(self, per_output: dict[tuple[str | None, str], dict], published: dict) -> None:
        """Start merging the outputs of `per_output` (see `outputs_of`) not handed in or published yet."""
        jobs = [
            MergeJob(
                subset,
                key,
                output_prefix_for(self.cfg.output_prefix, key, subset),
                entry["stems"],
                entry["tokens"] * self.itemsize,
            )
            for (subset, key), entry in per_output.items()
            if (subset, key) not in published and (subset, key) not in self.handed_in
        ]
        if not jobs:
            return
        if self.pool is None:
            # Threads suffice: copy_file_range and the index passes (numpy, file writes) release the
            # GIL. Started only now, after the worker processes were forked from a one-thread process.
            self.pool = ThreadPoolExecutor(max_workers=max(1, self.cfg.workers))
            self.t0 = self.last_log = time.monotonic()
        for job in sorted(jobs, key=lambda j: -j.nbytes):
            self.handed_in.add((job.subset, job.key))
            self.ready += job.nbytes
            self.futures.append(self.pool.submit(self._run, job))

    def _run(self, job: MergeJob) -> None:
        first = True

        def copied(nbytes: int) -> None:  # after each shard's tokens are copied
            nonlocal first
            self._copied(nbytes)
            if first and self.cfg.batch_delay:  # debug: a pause while the output's temporary exists
                first = False
                self.cancelled.wait(self.cfg.batch_delay)
            if self.cancelled.is_set():
                raise MergeCancelled(job.prefix)

        if self.cancelled.is_set():
            raise MergeCancelled(job.prefix)
        merge_one(job, self.work_dir, self.plan_hash, self.cfg, copied)
        self.say(
            f"merge: {job.prefix}.bin/.idx ({len(job.stems)} shards, {job.nbytes / MB:,.1f} MB) published"
        )

    def _copied(self, nbytes: int) -> None:
        with self.lock:
            self.copied += nbytes
            now = time.monotonic()
            if now - self.last_log < self.cfg.log_interval and self.copied < self.ready:
                return
            self.last_log = now
            copied, ready = self.copied, self.ready
        self.say(
            f"merge: {copied / MB:,.1f} of the {ready / MB:,.1f} MB ready so far merged, "
            f"{copied / MB / max(now - self.t0, 1e-9):,.0f} MB/s"
        )

    def check(self) -> None:
        """Raise the error of a merge that failed, now rather than after all the tokenising."""
        for future in self.futures:
            if future.done() and future.exception() is not None:
                raise future.exception()

    def wait(self) -> None:
        for future in self.futures:
            future.result()

    def close(self, cancel: bool = False) -> None:
        """Cancel the merges not started and wait for those running (each publishes all or nothing);
        with `cancel` (an interrupt, an error) they stop after their current shard and remove their
        temporaries."""
        if cancel:
            self.cancelled.set()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def merge_outputs(
    cfg: PreprocessConfig,
    shards: Sequence[ShardSpec],
    results: dict[str, dict],
    published: dict,
    work_dir: str,
    dtype: str,
    say,
    merger: Merger,
) -> tuple[list[OutputInfo], BadLineStats, int]:
    """Every output merged from its shards in plan order, but those already handed to `merger` (merged
    early) and those published by an earlier, crashed run (kept as they are); waits for all."""
    per_output, bad, lines = outputs_of(shards, results, work_dir)
    if not per_output:
        raise NoDocumentsError(
            f"no documents were written: {lines:,} lines read, {bad.total:,} skipped "
            f"({', '.join(f'{r} {n}' for r, n in bad.counts.items() if n) or 'none bad'}). "
            "Check --json-keys and the input files."
        )
    key_order = {k: i for i, k in enumerate(cfg.json_keys)}
    outputs: list[OutputInfo] = []
    for subset, key in sorted(per_output, key=lambda sk: (sk[0] or "", key_order[sk[1]])):
        entry = per_output[(subset, key)]
        prefix = output_prefix_for(cfg.output_prefix, key, subset)
        outputs.append(OutputInfo(prefix, subset, key, entry["documents"], entry["tokens"], dtype))
        if (subset, key) in published:
            say(f"merge: {prefix}.bin/.idx was published by an earlier run; kept")
    merger.submit(per_output, published)
    merger.wait()
    return outputs, bad, lines


def write_blends(cfg: PreprocessConfig, outputs: list[OutputInfo]) -> list[str]:
    blends = []
    if cfg.split_by_subset:
        for key in cfg.json_keys:
            datasets = [
                {"subset": o.subset, "prefix": o.prefix, "documents": o.documents, "tokens": o.tokens}
                for o in outputs
                if o.key == key
            ]
            if datasets:
                path = blend_path_for(cfg.output_prefix, key, cfg.json_keys)
                write_blend(path, datasets, cfg.blend_weighting)
                blends.append(path)
    return blends
