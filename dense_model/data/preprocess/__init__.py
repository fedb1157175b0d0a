"""Tokenise JSON lines, Parquet or Arrow into Megatron mmap datasets: sharded, parallel, resumable,
atomic, on one machine or split over several.

    python toolkits/pretrain_data_preprocessing/preprocess_data.py --input DATA/ \\
        --output-prefix out/red --tokenizer-type sentencepiece --tokenizer-model tok.model \\
        --append-eod --workers 8 [--split-by-subset] [--task-index I --num-tasks N]

How a run goes (`preprocess`):

1. Plan shards: each compressed file is one shard (a zstd/gzip stream cannot be entered in the
   middle, so parallelism over compressed input comes from having several files, as RedPajama
   has); each plain file is cut into byte ranges of `--shard-size-mb` (by default total/128
   clamped to 0.25..256 MB), a range owning the lines that start inside it; Parquet files are cut
   at row groups and Arrow files into row ranges of about that size (`tables.py`). The plan
   depends only on the inputs and the shard size, never on the worker or task count; and since
   shards are merged in plan order, the output bytes do not depend on the shard size either.
2. Work folder `OUTPUT_PREFIX.shards/` holds `manifest.json` (tokenizer fingerprint, keys, EOD,
   subset mode), a lock, and per finished shard its datasets plus `ID.done.json` (its counts and
   line count), written last. A shard's ID hashes its file, byte or row range, size and mtime.
3. Workers (`--workers` processes; forked, or spawned if this process runs other threads: see
   `pool.start_method`) take
   whole shards, largest first (with `--subset-from layout`: subset by subset, largest subset
   first, see `plan.dispatch_order`), and write their datasets themselves (`ShardJob`): read records,
   encode in batches of ~1 MB of text with `encode_batch`, write tokens with numpy. Nothing but
   small counters travels between processes. Memory per worker: one batch of text and its tokens,
   plus 4 bytes per document of the shard.
4. Merge: per output, the shards' datasets are concatenated in plan order (`indexed.merge_datasets`:
   .bin in the kernel, .idx streamed), several outputs at once, largest first, so the bytes are
   identical whatever the worker count. Outputs are written under temporary names, fsynced and
   renamed when complete; then `published.HASH.json` records each, and its shard files are deleted.
   Then the blend file, then the work folder is removed. Workers die with the main process (Linux
   PDEATHSIG), so a killed run leaves no orphan writing into the work folder. Merges run in threads
   of the main process. By default they start once every shard is done, since a record may name any
   subset (`red_pajama_subset`, `meta`); with `--split-by-subset --subset-from layout` a subset is
   its files' place alone, so each subset's outputs are merged, published and their shards deleted
   as soon as its own shards are done, while the other subsets are still being tokenised. Disk peak:
   inputs + the tokens written so far + a second copy of the outputs being merged (an output and
   its shards coexist until it is published): by default, where every output merges at the end, up
   to inputs + 2x outputs; with layout subsets about inputs + outputs + the subsets merging at that
   moment, the largest first (a filesystem with reflinks shares the copies' extents).

Several tasks (`--task-index I --num-tasks N`, or `--slurm-array` in a SLURM job array): every task plans the same
shards; task I takes every N-th of them, largest first, into the shared work folder. The task that
then finds every shard done merges; `merge.claim`, created with O_EXCL, lets only one do so (the same
task index requeued takes it over; `--merge-only` only if its claimant is gone). Each task index is
held by one process at a time (`task.I.claim`: host, boot id, pid namespace, pid, start time, SLURM
job and restart count; see `claims.py` and `procutil.holder_state`):
a second instance exits with a line naming the holder.

Resume: rerunning the same command after a crash, a kill, Ctrl-C or SIGTERM reuses every finished
shard and every output already published, and redoes the rest; it first removes the temporaries a
killed run of this prefix left (`claims.remove_stale_temporaries`). Ctrl-C and SIGTERM stop the
workers and the merges under way, which remove their temporaries. Changed input files (size or
mtime) redo only their own shards. A different tokenizer, key, --append-eod, --split-by-subset,
--strict or task count is refused, naming both values (or restarted with `--restart`). What survives
what: docs/safety.md.

The stages, each a module below this package (a stage imports only the ones above it in this list):
`config` (settings, errors, summary), `claims` (task and merge claims, stale temporaries), `plan`
(files, shards, dispatch order, output names), `shard` (one shard tokenised), `progress`, `pool`
(worker processes), `workdir` (lock, manifest, finished shards, published outputs), `merge`, `run`
(`preprocess`), `cli` (the command line,
also `python -m dense_model.data.preprocess`).
"""

from dense_model.data.preprocess.config import (
    MANIFEST_VERSION,
    MB,
    SUBSET_SOURCES,
    NoDocumentsError,
    OutputInfo,
    PreprocessConfig,
    PreprocessSummary,
    ResumeError,
)
from dense_model.data.preprocess.plan import (
    ShardSpec,
    blend_path_for,
    default_shard_size,
    output_prefix_for,
    plan_shards,
)
from dense_model.data.preprocess.pool import start_method
from dense_model.data.preprocess.run import preprocess
from dense_model.data.preprocess.shard import ShardContext, ShardJob, process_shard
from dense_model.data.preprocess.workdir import claim_merge

_claim_merge = claim_merge  # its name before the split

__all__ = [
    "MANIFEST_VERSION",
    "MB",
    "SUBSET_SOURCES",
    "NoDocumentsError",
    "OutputInfo",
    "PreprocessConfig",
    "PreprocessSummary",
    "ResumeError",
    "ShardContext",
    "ShardJob",
    "ShardSpec",
    "blend_path_for",
    "claim_merge",
    "default_shard_size",
    "output_prefix_for",
    "plan_shards",
    "preprocess",
    "process_shard",
    "start_method",
]
