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
3. Workers (`--workers` processes; forked, or spawned if this process runs other threads) take
   whole shards, largest first (with `--subset-from layout`: subset by subset, largest subset
   first, see `_dispatch_order`), and write their datasets themselves (`ShardJob`): read records,
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

Several tasks (`--task-index I --num-tasks N`, e.g. a SLURM job array): every task plans the same
shards; task I takes every N-th of them, largest first, into the shared work folder. The task that
then finds every shard done merges; `merge.claim`, created with O_EXCL, lets only one do so (the same
task requeued, or `--merge-only`, takes the claim over).

Resume: rerunning the same command after a crash, a kill or Ctrl-C reuses every finished shard
and every output already published, and redoes the rest. Changed input files (size or mtime) redo
only their own shards. A different tokenizer, key, --append-eod or --split-by-subset is refused (or
restarted with `--restart`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import queue
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from dense_model.data.blend import WEIGHTINGS, write_blend
from dense_model.data.indexed import (
    DocumentWriter,
    merge_datasets,
    publish,
    read_index_header,
    tmp_name,
    token_dtype,
)
from dense_model.data.jsonl import (
    BadLineError,
    BadLineStats,
    LineSource,
    absolute_line,
    compression_of,
    expand_inputs_with_roots,
    subset_from_path,
    subset_from_record,
)
from dense_model.data.tables import SUBSET_COLUMNS, hf_dataset_files, is_table, iter_table_rows, table_ranges
from dense_model.data.tokenizers import Tokenizer, build_tokenizer
from dense_model.procutil import die_with_parent

MANIFEST_VERSION = 1
MB = 1_000_000
SUBSET_SOURCES = ("record", "layout")  # values of --subset-from


class ResumeError(RuntimeError):
    """The work folder belongs to a run with other settings."""


class NoDocumentsError(RuntimeError):
    """Every line was skipped: nothing to write."""


@dataclass
class PreprocessConfig:
    """One preprocessing run (the CLI flags, see preprocess_data.py --help)."""

    inputs: Sequence[str]
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: str
    json_keys: Sequence[str] = ("text",)
    append_eod: bool = False
    workers: int = 1
    split_by_subset: bool = False
    # Where --split-by-subset finds a record's subset: "record" (its red_pajama_subset/meta fields,
    # else the file layout) or "layout" (the file layout alone: every shard's subset is known before
    # it is read, so each subset is merged as soon as its own shards are done).
    subset_from: str = "record"
    blend_weighting: str = "tokens"
    strict: bool = False
    shard_size_mb: float | None = None
    progress: bool | None = None  # None: a bar when stderr is a terminal
    restart: bool = False
    keep_shards: bool = False
    log_interval: float = 60.0
    batch_chars: int = 1 << 20  # characters of text per encode_batch call
    hf_dataset: str | None = None  # a Hugging Face dataset name, read from the local cache
    hf_split: str = "train"
    task_index: int = 0  # this task's share of the shard plan, of num_tasks (several machines)
    num_tasks: int = 1
    merge_only: bool = False  # tokenise nothing: merge once every task's shards are done
    # Debug option: seconds to sleep after each encoded batch and each merged output (slows a run
    # down to watch or kill it).
    batch_delay: float = 0.0


@dataclass(frozen=True)
class ShardSpec:
    """A piece of work: the lines of `path` starting in [start, end) (end None: to the end)."""

    path: str
    path_subset: str
    start: int
    end: int | None
    file_size: int
    mtime_ns: int
    table_bytes: int = 0  # Parquet/Arrow: about how many bytes rows [start, end) take in the file

    @property
    def is_table(self) -> bool:
        """Parquet/Arrow: start and end count rows, not bytes."""
        return is_table(self.path)

    @property
    def id(self) -> str:
        key = json.dumps([self.path, self.path_subset, self.start, self.end, self.file_size, self.mtime_ns])
        return hashlib.sha1(key.encode()).hexdigest()[:20]

    @property
    def input_bytes(self) -> int:
        if self.is_table:
            return self.table_bytes
        return (self.end if self.end is not None else self.file_size) - self.start


@dataclass
class OutputInfo:
    prefix: str
    subset: str | None
    key: str
    documents: int
    tokens: int
    dtype: str


@dataclass
class PreprocessSummary:
    outputs: list[OutputInfo]
    bad: BadLineStats
    files: int
    total_bytes: int  # all input files
    input_bytes: int  # read by this run (reused shards excluded)
    shards: int
    shards_reused: int
    lines: int
    seconds: float
    tokens_this_run: int = 0  # tokens of the shards this run tokenised (reused ones excluded)
    blends: list[str] = field(default_factory=list)
    merged: bool = True  # False: a task of a multi-task run that left the merge to another task

    @property
    def documents(self) -> int:
        return sum(o.documents for o in self.outputs)

    @property
    def tokens(self) -> int:
        return sum(o.tokens for o in self.outputs)

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self.bad.counts)

    def format(self) -> str:
        secs = max(self.seconds, 1e-9)
        lines = [
            f"preprocess: done in {self.seconds:.1f} s",
            f"  input: {self.files} files, {self.total_bytes / MB:,.1f} MB, {self.shards} shards"
            + (f" ({self.shards_reused} reused from an earlier run)" if self.shards_reused else ""),
            f"  documents: {self.documents:,}  tokens: {self.tokens:,}  "
            f"(this run: {self.tokens_this_run / secs:,.0f} tokens/s, {self.input_bytes / MB / secs:,.2f} MB/s)",
        ]
        bad = self.bad
        reasons = ", ".join(f"{r} {n:,}" for r, n in bad.counts.items() if n)
        lines.append(f"  skipped lines: {bad.total:,}" + (f" ({reasons})" if reasons else ""))
        if bad.blank_lines:
            lines.append(f"  blank lines ignored: {bad.blank_lines:,}")
        if bad.positions:
            lines.append("  first bad lines: " + "; ".join(bad.resolved_positions()))
        lines.append("  outputs:" if self.merged else "  outputs: merged by another task")
        for o in self.outputs:
            lines.append(
                f"    {o.prefix}.bin/.idx  {o.documents:,} documents, {o.tokens:,} tokens, {o.dtype}"
            )
        for blend in self.blends:
            lines.append(f"  blend: {blend}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# planning


def output_prefix_for(output_prefix: str, key: str, subset: str | None) -> str:
    """Megatron-LM naming: PREFIX_{key}_document, or PREFIX_{subset}_{key}_document per subset."""
    middle = f"_{subset}" if subset else ""
    return f"{output_prefix}{middle}_{key}_document"


def blend_path_for(output_prefix: str, key: str, keys: Sequence[str]) -> str:
    return f"{output_prefix}_blend.json" if len(keys) == 1 else f"{output_prefix}_{key}_blend.json"


def default_shard_size(total_bytes: int) -> int:
    """About 128 shards for small inputs (so that the last shards, which some workers wait for, are a
    small part of the work), 256 MB shards for big ones (>32 GB), never under 0.25 MB."""
    return int(min(max(total_bytes / 128, MB / 4), 256 * MB))


def plan_shards(files: Sequence[tuple[str, str]], shard_size: int) -> list[ShardSpec]:
    shards = []
    for path, root in files:
        st = os.stat(path)
        subset = subset_from_path(path, root)
        if is_table(path):
            for start, end, size in table_ranges(path, shard_size):
                shards.append(ShardSpec(path, subset, start, end, st.st_size, st.st_mtime_ns, size))
            continue
        if compression_of(path) is not None or st.st_size <= shard_size:
            shards.append(ShardSpec(path, subset, 0, None, st.st_size, st.st_mtime_ns))
            continue
        for start in range(0, st.st_size, shard_size):
            end = min(start + shard_size, st.st_size)
            shards.append(
                ShardSpec(path, subset, start, None if end == st.st_size else end, st.st_size, st.st_mtime_ns)
            )
    return shards


# --------------------------------------------------------------------------------------------------
# one shard (runs in a worker process, or inline with --workers 1)


@dataclass
class ShardContext:
    tokenizer: Tokenizer
    work_dir: str
    json_keys: tuple[str, ...]
    append_eod: bool
    split_by_subset: bool
    strict: bool
    dtype: str
    subset_from: str
    batch_chars: int
    batch_delay: float = 0.0  # debug option: seconds to sleep after each batch


def _is_bad_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


Output = tuple[str | None, int]  # (subset or None, index of the key in --json-keys)


class ShardJob:
    """Tokenises one shard into `work_dir/ID.N.bin/.idx` (one per output) and `ID.done.json`.

    Records (JSON lines or table rows) are judged, their texts gathered until `batch_chars`, then
    encoded with one `encode_batch` call and written to the writer of their output. `report(documents,
    tokens, input_bytes, characters)` receives increments after each batch. Line numbers are counted from the
    shard's first line (see `LineSource`); the main process makes them absolute.
    """

    def __init__(
        self, spec: ShardSpec, ctx: ShardContext, report: Callable[[int, int, int, int], None]
    ) -> None:
        self.spec, self.ctx, self.report = spec, ctx, report
        self.bad = BadLineStats()
        self.lines = 0
        self.writers: dict[Output, DocumentWriter] = {}
        self.out_meta: list[dict] = []
        self.texts: list[str] = []
        self.dests: list[tuple[Output, int, int]] = []  # (output, line number, offset) per text
        self.chars = 0
        self.reported_bytes = 0
        self.rows_read = 0  # tables: rows of finished batches, for input_bytes
        self.flushing = False
        self.source: LineSource | None = None

    def run(self) -> dict:
        records = self._table_records() if self.spec.is_table else self._json_records()
        try:
            for number, offset, record in records:
                self._add_record(number, offset, record)
                if self.chars >= self.ctx.batch_chars:
                    self._flush()
            self._flush()
            self.report(0, 0, self.spec.input_bytes - self.reported_bytes, 0)
            outputs = []
            for meta, w in zip(self.out_meta, self.writers.values()):
                w.finish()
                outputs.append({**meta, "documents": w.documents, "tokens": w.tokens})
        except BaseException:
            for w in self.writers.values():
                w.abort()
            raise
        result = {
            "id": self.spec.id,
            "outputs": outputs,
            "bad": self.bad.to_json(),
            "lines": self.lines,
            "input_bytes": self.spec.input_bytes,
        }
        done = os.path.join(self.ctx.work_dir, f"{self.spec.id}.done.json")
        tmp = tmp_name(done)
        with open(tmp, "w") as f:
            json.dump(result, f)
        publish([(tmp, done)], durable=False)
        return result

    # reading

    def _json_records(self) -> Iterator[tuple[int, int, dict]]:
        """(line number, byte offset, record) per JSON object line; other lines are counted here."""
        self.source = LineSource(self.spec.path, self.spec.start, self.spec.end)
        loads = json.loads
        for number, offset, raw in self.source:
            self.lines += 1
            if len(raw) <= 2 and not raw.strip():
                self.bad.blank_lines += 1
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                self._skip("invalid_utf8", number, offset, str(err))
                continue
            try:
                record = loads(line)
            except (ValueError, RecursionError) as err:
                if not line.strip():
                    self.bad.blank_lines += 1
                    continue
                self._skip("invalid_json", number, offset, str(err)[:80])
                continue
            if not isinstance(record, dict):
                self._skip("missing_key", number, offset, f"a JSON {type(record).__name__}, not an object")
                continue
            yield number, offset, record

    def _table_records(self) -> Iterator[tuple[int, int, dict]]:
        """(row number in the shard, row index in the file, row) per Parquet/Arrow row."""
        spec = self.spec
        from_record = self.ctx.split_by_subset and self.ctx.subset_from == "record"
        columns = [*self.ctx.json_keys, *(SUBSET_COLUMNS if from_record else ())]
        for first, rows in iter_table_rows(spec.path, spec.start, spec.end, columns):
            for i, row in enumerate(rows):
                self.lines += 1
                yield first - spec.start + i, first - 1 + i, row
            self.rows_read += len(rows)

    def _input_bytes_read(self) -> int:
        if self.source is not None:
            return self.source.input_bytes
        rows = max(self.spec.end - self.spec.start, 1)
        return self.spec.input_bytes * self.rows_read // rows

    # judging and writing

    def _add_record(self, number: int, offset: int, record: dict) -> None:
        if not self.ctx.split_by_subset:
            subset = None
        elif self.ctx.subset_from == "layout":
            subset = self.spec.path_subset
        else:
            subset = subset_from_record(record) or self.spec.path_subset
        for k, key in enumerate(self.ctx.json_keys):
            text = record.get(key)
            if text is None and key not in record:
                self._skip("missing_key", number, offset, f"no {key!r}")
            elif not isinstance(text, str):
                self._skip("not_string", number, offset, f"{key!r} is {type(text).__name__}")
            elif not text or text.isspace():
                self._skip("empty_text", number, offset, f"{key!r} is empty")
            else:
                self.texts.append(text)
                self.dests.append(((subset, k), number, offset))
                self.chars += len(text)

    def _skip(self, reason: str, number: int, offset: int, detail: str = "") -> None:
        spec = self.spec
        if self.ctx.strict:
            if not self.flushing:
                self._flush()  # the pending texts come first and may hold an earlier bad line (a lone surrogate)
            # Absolute where known here; for later byte ranges the main process counts the line.
            line = number + spec.start if spec.is_table else (number if spec.start == 0 else None)
            raise BadLineError(reason, spec.path, line, offset, detail)
        self.bad.add(reason, spec.path, number, offset)

    def _writer_for(self, dest: Output) -> DocumentWriter:
        w = self.writers.get(dest)
        if w is None:
            stem = os.path.join(self.ctx.work_dir, f"{self.spec.id}.{len(self.writers)}")
            # Shard files skip fsync (~2 ms each, 5% of a small shard): a run killed or crashed keeps them
            # intact (renames are atomic); after a power cut `_shard_is_intact` rejects damaged ones.
            w = self.writers[dest] = DocumentWriter(stem, self.ctx.dtype, durable=False)
            self.out_meta.append(
                {"subset": dest[0], "key": self.ctx.json_keys[dest[1]], "stem": os.path.basename(stem)}
            )
        return w

    def _encode(self) -> list[list[int] | None]:
        tok = self.ctx.tokenizer
        try:
            return tok.encode_batch(self.texts)
        except Exception:
            # One bad text (e.g. a lone surrogate from a "\ud800" escape) fails the whole batch.
            encoded: list[list[int] | None] = []
            for text, (_, number, offset) in zip(self.texts, self.dests):
                try:
                    encoded.append(tok.encode(text))
                except Exception:
                    if not _is_bad_unicode(text):
                        raise
                    self._skip("invalid_utf8", number, offset, "text holds a lone surrogate")
                    encoded.append(None)
            return encoded

    def _flush(self) -> None:
        if not self.texts:
            return
        self.flushing = True
        try:
            encoded = self._encode()
            eod = self.ctx.tokenizer.eod
            grouped: dict[Output, list[list[int]]] = {}
            for ids, (dest, number, offset) in zip(encoded, self.dests):
                if ids is None:
                    continue
                if not ids:
                    self._skip("empty_text", number, offset, "encodes to no tokens")
                    continue
                if self.ctx.append_eod:
                    ids.append(eod)
                grouped.setdefault(dest, []).append(ids)
        finally:
            self.flushing = False
        documents = tokens = 0
        for dest, docs in grouped.items():
            w = self._writer_for(dest)
            before = w.tokens
            w.add_documents(docs)
            documents += len(docs)
            tokens += w.tokens - before
        chars = self.chars
        self.texts.clear()
        self.dests.clear()
        self.chars = 0
        consumed = self._input_bytes_read()
        self.report(documents, tokens, consumed - self.reported_bytes, chars)
        self.reported_bytes = consumed
        if self.ctx.batch_delay:
            time.sleep(self.ctx.batch_delay)


def process_shard(spec: ShardSpec, ctx: ShardContext, report: Callable[[int, int, int, int], None]) -> dict:
    """Tokenise one shard (see `ShardJob`); returns its result, also written to `ID.done.json`."""
    return ShardJob(spec, ctx, report).run()


def _shard_is_intact(work_dir: str, result: dict, published: set[tuple[str | None, str]]) -> bool:
    """A finished shard may be reused if its files exist and agree with its recorded counts (files of
    outputs already `published` were deleted on purpose and are not needed again)."""
    try:
        for out in result["outputs"]:
            if (out["subset"], out["key"]) in published:
                continue
            stem = os.path.join(work_dir, out["stem"])
            header = read_index_header(stem + ".idx")
            if header.documents != out["documents"] or header.sequence_count != out["documents"]:
                return False
            if os.path.getsize(stem + ".bin") != out["tokens"] * header.itemsize:
                return False
            if int(header.lengths().sum(dtype=np.int64)) != out["tokens"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


# --------------------------------------------------------------------------------------------------
# worker processes


def _worker_main(wid: int, parent_pid: int, ctx_args: dict, pending, taken, results) -> None:
    if not die_with_parent(parent_pid):  # the parent died before we asked
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    current = None
    try:
        tokenizer = build_tokenizer(ctx_args.pop("tokenizer_type"), ctx_args.pop("tokenizer_model"))
        ctx = ShardContext(tokenizer=tokenizer, **ctx_args)
        while True:
            with taken.get_lock():  # the next shard nobody took yet
                n = taken.value
                taken.value += 1
            if n >= len(pending):
                results.put(("exit", wid))
                return
            spec = pending[n]
            current = spec.id
            results.put(("start", wid, spec.id))
            result = process_shard(spec, ctx, lambda *counts: results.put(("progress", wid, *counts)))
            results.put(("done", wid, result))
    except BaseException as err:  # noqa: BLE001 - everything goes back to the parent
        try:
            import pickle

            pickle.dumps(err)
        except Exception:
            err = RuntimeError(f"{type(err).__name__}: {err}")
        results.put(("error", wid, current, err, traceback.format_exc()))


class _Progress:
    """tqdm bar (documents, tokens, MB/s) on a terminal; else a log line every `interval` seconds.

    The bar advances by input bytes as stored (compressed bytes for compressed files, so that it
    reaches the total); the text tokenised is counted apart, in characters."""

    def __init__(self, total_bytes: int, enabled: bool | None, interval: float, log, shards: int) -> None:
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.docs = self.tokens = self.bytes = self.chars = self.shards_done = 0
        self.shards = shards
        self.log, self.interval = log, interval
        self.start = self.last_log = time.monotonic()
        self.bar = None
        self._enabled, self._total = enabled, total_bytes

    def begin(self) -> None:
        """Show the bar; called once workers are started (tqdm starts a thread, and fork wants none)."""
        if self._enabled and self.bar is None:
            from tqdm import tqdm

            # get_terminal_size falls back to 100 columns where the terminal reports 0 (some ptys).
            width = shutil.get_terminal_size((100, 20)).columns
            self.bar = tqdm(total=self._total, unit="B", unit_scale=True, desc="tokenizing", ncols=width)

    def update(self, docs: int, tokens: int, nbytes: int, chars: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bytes += nbytes
        self.chars += chars
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix_str(f"docs={self.docs:,} tokens={self.tokens:,}", refresh=False)
        else:
            self.maybe_log()

    def maybe_log(self) -> None:
        now = time.monotonic()
        if self.bar is None and self.log is not None and now - self.last_log >= self.interval:
            self.last_log = now
            secs = max(now - self.start, 1e-9)
            self.log(
                f"progress: {self.shards_done}/{self.shards} shards, {self.bytes / MB:,.1f} of "
                f"{self._total / MB:,.1f} MB of input read ({self.bytes / MB / secs:.2f} MB/s), "
                f"{self.chars / MB:,.1f} M characters tokenised, {self.docs:,} documents, {self.tokens:,} tokens"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def start_method() -> str:
    """How worker processes start: "fork" (in milliseconds; spawn re-imports numpy and the tokenizer,
    ~0.2 s of CPU each, 5% of a 2-core run on 40 MB) where it is safe, on Linux while this process
    runs no other thread; else "spawn". Workers then see this module as imported afresh: whatever a
    caller patched in this process reaches them only with fork."""
    return "fork" if sys.platform == "linux" and threading.active_count() == 1 else "spawn"


def _run_pool(
    pending: list[ShardSpec], workers: int, ctx_args: dict, progress: _Progress, on_start, on_done
) -> None:
    mp = multiprocessing.get_context(start_method())
    # The shards go to every worker with its arguments; a shared counter hands them out. (A task queue
    # would leave a feeder thread in this process, after which a later pool could no longer fork.)
    taken, results = mp.Value("l", 0), mp.Queue()
    procs = [
        mp.Process(
            target=_worker_main, args=(i, os.getpid(), dict(ctx_args), pending, taken, results), daemon=True
        )
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    progress.begin()
    on_start()  # may start threads: the workers are forked
    current: dict[int, str] = {}
    exited: set[int] = set()
    remaining = len(pending)
    try:
        while remaining:
            try:
                msg = results.get(timeout=0.5)
            except queue.Empty:
                progress.maybe_log()
                for wid, p in enumerate(procs):
                    if wid not in exited and p.exitcode is not None:
                        # Died without a word: killed (OOM?) or crashed in native code.
                        raise RuntimeError(
                            f"worker {wid} died (exit code {p.exitcode}) while processing shard "
                            f"{current.get(wid, '?')}; finished shards are kept, rerun the same command to resume."
                        ) from None
                continue
            kind = msg[0]
            if kind == "progress":
                progress.update(*msg[2:])
            elif kind == "start":
                current[msg[1]] = msg[2]
            elif kind == "done":
                remaining -= 1
                current.pop(msg[1], None)
                on_done(msg[2])
            elif kind == "exit":
                exited.add(msg[1])
            elif kind == "error":
                _, wid, shard_id, err, tb = msg
                if isinstance(err, BadLineError | KeyboardInterrupt):
                    raise err
                raise RuntimeError(f"worker {wid} failed on shard {shard_id}:\n{tb}") from err
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
        results.cancel_join_thread()


# --------------------------------------------------------------------------------------------------
# the run


@contextlib.contextmanager
def _locked(work_dir: str, wait: bool = False):
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


def _settings(cfg: PreprocessConfig, tokenizer: Tokenizer, dtype: str) -> dict:
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


def _prepare_work_dir(work_dir: str, settings: dict, restart: bool, log) -> dict | None:
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
_RUN_FILES = ("lock", "manifest.json", "merge.claim")
_PUBLISHED = "published."  # published.HASH.json: an output merged, renamed and recorded


def _is_run_file(name: str) -> bool:
    return name in _RUN_FILES or name.startswith(_PUBLISHED)


def _reset_work_dir(work_dir: str) -> None:
    for name in os.listdir(work_dir):
        if name != "lock":
            os.remove(os.path.join(work_dir, name))


def _input_files(cfg: PreprocessConfig) -> list[tuple[str, str]]:
    files = expand_inputs_with_roots(cfg.inputs) if cfg.inputs else []
    if cfg.hf_dataset:
        files += [(path, os.path.dirname(path)) for path in hf_dataset_files(cfg.hf_dataset, cfg.hf_split)]
    if not files:
        raise ValueError("no input: give --input files/folders/globs or --hf-dataset NAME")
    return files


def _dispatch_order(shards: Sequence[ShardSpec], by_subset: bool) -> list[ShardSpec]:
    """Largest shards first, so that no big shard starts last and runs alone. With `by_subset` (subsets
    from the file layout), subset after subset, the largest first, each largest shard first: each
    subset is then done (and merged) early, the longest merge overlaps the most tokenising, and the
    smallest is what is left to merge at the end."""
    order = sorted(shards, key=lambda s: -s.input_bytes)
    if by_subset:
        totals: dict[str, int] = {}
        for spec in shards:
            totals[spec.path_subset] = totals.get(spec.path_subset, 0) + spec.input_bytes
        order.sort(key=lambda s: (-totals[s.path_subset], s.path_subset))  # stable: sizes stay in order
    return order


def _plan_hash(shards: Sequence[ShardSpec]) -> str:
    return hashlib.sha1("\n".join(s.id for s in shards).encode()).hexdigest()


def _published_outputs(work_dir: str, plan_hash: str) -> dict[tuple[str | None, str], dict]:
    """Outputs a crashed run already merged and published for this very shard plan, still intact."""
    found = {}
    for name in os.listdir(work_dir):
        if not (name.startswith(_PUBLISHED) and name.endswith(".json")):
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


def _finished_shards(work_dir: str, shards: Sequence[ShardSpec], published) -> dict[str, dict]:
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
            if _shard_is_intact(work_dir, result, set(published)):
                results[sid] = result
    return results


def _claim_merge(work_dir: str, cfg: PreprocessConfig) -> bool:
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


@dataclass
class _MergeJob:
    subset: str | None
    key: str
    prefix: str
    stems: list[str]
    nbytes: int  # token bytes to copy


def _merge_one(
    job: _MergeJob, work_dir: str, plan_hash: str, cfg: PreprocessConfig, on_copied: Callable[[int], None]
) -> None:
    """Merge one output, publish it, record it as published, then delete its shard files."""
    merge_datasets(job.stems, job.prefix, on_copied)
    record = {
        "subset": job.subset,
        "key": job.key,
        "prefix": job.prefix,
        "plan": plan_hash,
        "sizes": {ext: os.path.getsize(job.prefix + ext) for ext in (".bin", ".idx")},
    }
    marker = os.path.join(work_dir, _PUBLISHED + hashlib.sha1(job.prefix.encode()).hexdigest()[:16] + ".json")
    tmp = tmp_name(marker)
    with open(tmp, "w") as f:
        json.dump(record, f)
    publish([(tmp, marker)])
    if not cfg.keep_shards:  # the output is safe: its shards' tokens are no longer needed on disk
        for stem in job.stems:
            for ext in (".bin", ".idx"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(stem + ext)
    if cfg.batch_delay:
        time.sleep(cfg.batch_delay)


def _outputs_of(
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


class _Merger:
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

    def submit(self, per_output: dict[tuple[str | None, str], dict], published: dict) -> None:
        """Start merging the outputs of `per_output` (see `_outputs_of`) not handed in or published yet."""
        jobs = [
            _MergeJob(
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

    def _run(self, job: _MergeJob) -> None:
        _merge_one(job, self.work_dir, self.plan_hash, self.cfg, self._copied)
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

    def close(self) -> None:
        """Cancel the merges not started; wait for those running (each publishes all or nothing)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _merge_outputs(
    cfg: PreprocessConfig,
    shards: Sequence[ShardSpec],
    results: dict[str, dict],
    published: dict,
    work_dir: str,
    dtype: str,
    say,
    merger: _Merger,
) -> tuple[list[OutputInfo], BadLineStats, int]:
    """Every output merged from its shards in plan order, but those already handed to `merger` (merged
    early) and those published by an earlier, crashed run (kept as they are); waits for all."""
    per_output, bad, lines = _outputs_of(shards, results, work_dir)
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


def _write_blends(cfg: PreprocessConfig, outputs: list[OutputInfo]) -> list[str]:
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


def _check_config(cfg: PreprocessConfig) -> None:
    if cfg.blend_weighting not in WEIGHTINGS:
        raise ValueError(f"--blend-weighting {cfg.blend_weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
    if not cfg.json_keys:
        raise ValueError("--json-keys needs at least one key")
    if cfg.workers < 1:
        raise ValueError(f"--workers {cfg.workers}: must be at least 1")
    if cfg.num_tasks < 1 or not 0 <= cfg.task_index < cfg.num_tasks:
        raise ValueError(
            f"--task-index {cfg.task_index} --num-tasks {cfg.num_tasks}: need 0 <= task index < number of tasks"
        )
    if cfg.subset_from not in SUBSET_SOURCES:
        raise ValueError(f"--subset-from {cfg.subset_from!r}: choose one of {', '.join(SUBSET_SOURCES)}")
    if cfg.subset_from == "layout" and not cfg.split_by_subset:
        raise ValueError("--subset-from layout names where subsets come from: add --split-by-subset")
    if cfg.restart and (cfg.num_tasks > 1 or cfg.merge_only):
        raise ValueError("--restart discards every task's shards: run it without --num-tasks/--merge-only")


def preprocess(cfg: PreprocessConfig, log: Callable[[str], None] | None = print) -> PreprocessSummary:
    """Run (or resume) preprocessing, or this task's share of it; see the module docstring."""
    t0 = time.monotonic()
    say = log or (lambda _msg: None)
    _check_config(cfg)
    tokenizer = build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model)
    dtype = token_dtype(tokenizer.vocab_size).__name__
    files = _input_files(cfg)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.output_prefix)), exist_ok=True)
    work_dir = os.path.abspath(cfg.output_prefix) + ".shards"
    os.makedirs(work_dir, exist_ok=True)
    settings = _settings(cfg, tokenizer, dtype)
    several_tasks = cfg.num_tasks > 1 or cfg.merge_only
    task = f"task {cfg.task_index}/{cfg.num_tasks}: " if cfg.num_tasks > 1 else ""

    with contextlib.ExitStack() as lock, contextlib.ExitStack() as merging:
        lock.enter_context(_locked(work_dir, wait=several_tasks))
        manifest = _prepare_work_dir(work_dir, settings, cfg.restart, say)
        if manifest is None:
            _reset_work_dir(work_dir)
        total_bytes = sum(os.path.getsize(p) for p, _ in files)
        if cfg.shard_size_mb is not None:
            shard_size = max(int(cfg.shard_size_mb * MB), 1)
        elif manifest is not None:
            shard_size = int(manifest["shard_size"])
        else:
            shard_size = default_shard_size(total_bytes)
        shards = plan_shards(files, shard_size)
        tmp = tmp_name(os.path.join(work_dir, "manifest.json"))
        with open(tmp, "w") as f:
            json.dump(
                {"version": MANIFEST_VERSION, "settings": settings, "shard_size": shard_size}, f, indent=1
            )
        publish([(tmp, os.path.join(work_dir, "manifest.json"))])

        plan_hash = _plan_hash(shards)
        published = _published_outputs(work_dir, plan_hash)
        results = _finished_shards(work_dir, shards, published)
        # With several tasks, task i takes every N-th shard of this order (the same in every task).
        order = _dispatch_order(shards, by_subset=cfg.subset_from == "layout")
        if several_tasks:
            share = {s.id for n, s in enumerate(order) if n % cfg.num_tasks == cfg.task_index}
            share = set() if cfg.merge_only else share
        else:
            share = {s.id for s in shards}
        pending = [s for s in order if s.id not in results and s.id in share]
        # Drop what no finished shard owns (old plans, partial files), other tasks' shards excepted.
        for name in os.listdir(work_dir):
            sid = name.split(".", 1)[0]
            if not _is_run_file(name) and sid not in results and (sid in share or not several_tasks):
                os.remove(os.path.join(work_dir, name))
        if several_tasks:
            lock.close()  # tasks work side by side; each touches only its own shards
        reused = len(results)
        pending_bytes = sum(s.input_bytes for s in pending)
        workers = max(1, min(cfg.workers, len(pending)))
        say(
            f"preprocess: {task}{len(files)} files, {total_bytes / MB:,.1f} MB, {len(shards)} shards of up to "
            f"{shard_size / MB:.3g} MB"
            + (f"; resuming: {reused} shards already done, {len(pending)} to go" if reused else "")
            + (f"; {len(pending)} shards for this task" if several_tasks else "")
            + (f"; {workers} workers" if pending else "")
        )

        progress = _Progress(pending_bytes, cfg.progress, cfg.log_interval, log, len(pending))
        merger = _Merger(cfg, work_dir, plan_hash, np.dtype(dtype).itemsize, say)
        merging.callback(merger.close)
        # --subset-from layout on one machine: a subset's shards are known before any is read, so its
        # outputs are merged (and its shards deleted) as soon as they are done, while others tokenise.
        unmerged: dict[str, list[ShardSpec]] = {}
        if cfg.subset_from == "layout" and not several_tasks:
            for spec in shards:
                unmerged.setdefault(spec.path_subset, []).append(spec)

        def merge_ready() -> None:
            for subset in [k for k, specs in unmerged.items() if all(s.id in results for s in specs)]:
                merger.submit(_outputs_of(unmerged.pop(subset), results, work_dir)[0], published)
            merger.check()

        def on_done(result: dict) -> None:
            results[result["id"]] = result
            progress.shards_done += 1
            merge_ready()

        ctx_args = {
            "work_dir": work_dir,
            "json_keys": tuple(cfg.json_keys),
            "append_eod": bool(cfg.append_eod),
            "split_by_subset": bool(cfg.split_by_subset),
            "strict": bool(cfg.strict),
            "dtype": dtype,
            "subset_from": cfg.subset_from,
            "batch_chars": int(cfg.batch_chars),
            "batch_delay": float(cfg.batch_delay),
        }
        try:
            if workers == 1:
                ctx = ShardContext(tokenizer=tokenizer, **ctx_args)
                progress.begin()
                merge_ready()
                for spec in pending:
                    on_done(process_shard(spec, ctx, progress.update))
            elif pending:
                ctx_args.update(tokenizer_type=cfg.tokenizer_type, tokenizer_model=cfg.tokenizer_model)
                _run_pool(pending, workers, ctx_args, progress, merge_ready, on_done)
        except BadLineError as err:
            if err.line is None:
                err.line = absolute_line(err.path, err.offset)
            raise
        except KeyboardInterrupt:
            progress.close()
            say(
                f"\ninterrupted: {len(results)} of {len(shards)} shards are finished and kept in {work_dir}; "
                "rerun the same command to resume."
            )
            raise
        finally:
            progress.close()

        def summary(outputs, bad, lines, blends, merged=True) -> PreprocessSummary:
            result = PreprocessSummary(
                outputs=outputs,
                bad=bad,
                files=len(files),
                total_bytes=total_bytes,
                input_bytes=pending_bytes,
                shards=len(shards),
                shards_reused=reused,
                lines=lines,
                seconds=time.monotonic() - t0,
                tokens_this_run=sum(o["tokens"] for s in pending for o in results[s.id]["outputs"]),
                blends=blends,
                merged=merged,
            )
            say(result.format())
            return result

        if several_tasks:
            # Other tasks' shards finished meanwhile count too.
            results.update(_finished_shards(work_dir, [s for s in shards if s.id not in results], published))
            missing = sum(s.id not in results for s in shards)
            if missing and cfg.merge_only:
                raise RuntimeError(
                    f"--merge-only: {missing} of {len(shards)} shards in {work_dir} are not finished; rerun "
                    "the tasks that own them (the same command with their --task-index) first."
                )
            if missing:
                say(
                    f"{task}this task's shards are done; {missing} shards of other tasks are not: the last task merges"
                )
                return summary([], BadLineStats(), 0, [], merged=False)
            if not _claim_merge(work_dir, cfg):
                say(f"{task}every shard is done; another task claimed the merge")
                return summary([], BadLineStats(), 0, [], merged=False)
        outputs, bad, lines = _merge_outputs(cfg, shards, results, published, work_dir, dtype, say, merger)
        blends = _write_blends(cfg, outputs)

    if not cfg.keep_shards:
        shutil.rmtree(work_dir, ignore_errors=True)
    return summary(outputs, bad, lines, blends)
