"""Tokenise JSON lines into Megatron mmap datasets: sharded, parallel, resumable, atomic.

    python toolkits/pretrain_data_preprocessing/preprocess_data.py --input DATA/ \\
        --output-prefix out/red --tokenizer-type sentencepiece --tokenizer-model tok.model \\
        --append-eod --workers 8 [--split-by-subset]

How a run goes (`preprocess`):

1. Plan shards: each compressed file is one shard (a zstd/gzip stream cannot be entered in the
   middle, so parallelism over compressed input comes from having several files, as RedPajama
   has); each plain file is cut into byte ranges of `--shard-size-mb` (by default total/128
   clamped to 0.25..256 MB), a range owning the lines that start inside it. The plan depends only
   on the inputs and the shard size, never on the worker count; and since shards are merged in
   plan order, the output bytes do not depend on the shard size either.
2. Work folder `OUTPUT_PREFIX.shards/` holds `manifest.json` (tokenizer fingerprint, keys, EOD,
   subset mode), a lock, and per finished shard its datasets plus `ID.done.json` (its counts),
   written last. A shard's ID hashes its file, byte range, file size and mtime.
3. Workers (`--workers` processes; forked, or spawned if this process runs other threads) take
   whole shards and write their datasets themselves: read lines, parse with `json.loads`, encode
   in batches of ~1 MB of text with `encode_batch`, write tokens with numpy. Nothing but small
   counters travels between processes. Memory per worker: one batch of text and its tokens, plus
   4 bytes per document of the shard.
4. Merge: per output, the shards' datasets are concatenated in plan order by streaming copies
   (`indexed.merge_datasets`), so the bytes are identical whatever the worker count. Outputs are
   written under temporary names, fsynced and renamed when complete. Then the blend file, then the
   work folder is removed. Workers die with the main process (Linux PDEATHSIG), so a killed run
   leaves no orphan writing into the work folder.

Resume: rerunning the same command after a crash, a kill or Ctrl-C reuses every finished shard
and redoes the others. Changed input files (size or mtime) redo only their own shards. A different
tokenizer, key, --append-eod or --split-by-subset is refused (or restarted with `--restart`).
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
from collections.abc import Callable, Sequence
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
from dense_model.data.tokenizers import Tokenizer, build_tokenizer
from dense_model.procutil import die_with_parent

MANIFEST_VERSION = 1
MB = 1_000_000
# Test hook: seconds to sleep after each encoded batch, so a test can kill a run midway.
DELAY_ENV = "DENSE_MODEL_PREPROCESS_TEST_DELAY"


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
    blend_weighting: str = "tokens"
    strict: bool = False
    shard_size_mb: float | None = None
    progress: bool | None = None  # None: a bar when stderr is a terminal
    restart: bool = False
    keep_shards: bool = False
    log_interval: float = 60.0
    batch_chars: int = 1 << 20  # characters of text per encode_batch call


@dataclass(frozen=True)
class ShardSpec:
    """A piece of work: the lines of `path` starting in [start, end) (end None: to the end)."""

    path: str
    path_subset: str
    start: int
    end: int | None
    file_size: int
    mtime_ns: int

    @property
    def id(self) -> str:
        key = json.dumps([self.path, self.path_subset, self.start, self.end, self.file_size, self.mtime_ns])
        return hashlib.sha1(key.encode()).hexdigest()[:20]

    @property
    def input_bytes(self) -> int:
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
        lines.append("  outputs:")
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
    batch_chars: int


def _is_bad_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def process_shard(spec: ShardSpec, ctx: ShardContext, report: Callable[[int, int, int], None]) -> dict:
    """Tokenise one shard into `work_dir/ID.N.bin/.idx` (one per output) and `ID.done.json`.

    `report(documents, tokens, input_bytes)` receives increments after each batch.
    """
    tok = ctx.tokenizer
    eod = tok.eod
    keys = ctx.json_keys
    strict, split, append_eod = ctx.strict, ctx.split_by_subset, ctx.append_eod
    path = spec.path
    bad = BadLineStats()
    writers: dict[tuple[str | None, int], DocumentWriter] = {}
    out_meta: list[dict] = []
    texts: list[str] = []
    dests: list[tuple[tuple[str | None, int], int, int]] = []  # (output, line number, offset)
    state = {"chars": 0, "reported_bytes": 0, "flushing": False}
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    source = LineSource(path, spec.start, spec.end)

    def skip(reason: str, number: int, offset: int, detail: str = "") -> None:
        if strict:
            if not state["flushing"]:
                flush()  # the pending texts come first and may hold an earlier bad line (a lone surrogate)
            raise BadLineError(reason, path, number or None, offset, detail)
        bad.add(reason, path, number, offset)

    def writer_for(dest: tuple[str | None, int]) -> DocumentWriter:
        w = writers.get(dest)
        if w is None:
            stem = os.path.join(ctx.work_dir, f"{spec.id}.{len(writers)}")
            # Shard files skip fsync (~2 ms each, 5% of a small shard): a run killed or crashed keeps them
            # intact (renames are atomic); after a power cut `_shard_is_intact` rejects damaged ones.
            w = writers[dest] = DocumentWriter(stem, ctx.dtype, durable=False)
            out_meta.append({"subset": dest[0], "key": keys[dest[1]], "stem": os.path.basename(stem)})
        return w

    def flush() -> None:
        if not texts:
            return
        state["flushing"] = True
        try:
            _flush()
        finally:
            state["flushing"] = False

    def _flush() -> None:
        try:
            encoded = tok.encode_batch(texts)
        except Exception:
            # One bad text (e.g. a lone surrogate from a "\ud800" escape) fails the whole batch.
            encoded = []
            for text, (_, number, offset) in zip(texts, dests):
                try:
                    encoded.append(tok.encode(text))
                except Exception:
                    if not _is_bad_unicode(text):
                        raise
                    skip("invalid_utf8", number, offset, "text holds a lone surrogate")
                    encoded.append(None)
        docs_before = sum(w.documents for w in writers.values())
        tokens_before = sum(w.tokens for w in writers.values())
        grouped: dict[tuple[str | None, int], list[list[int]]] = {}
        for ids, (dest, number, offset) in zip(encoded, dests):
            if ids is None:
                continue
            if not ids:
                skip("empty_text", number, offset, "encodes to no tokens")
                continue
            if append_eod:
                ids.append(eod)
            group = grouped.get(dest)
            if group is None:
                group = grouped[dest] = []
            group.append(ids)
        for dest, docs in grouped.items():
            writer_for(dest).add_documents(docs)
        texts.clear()
        dests.clear()
        state["chars"] = 0
        consumed = source.input_bytes
        report(
            sum(w.documents for w in writers.values()) - docs_before,
            sum(w.tokens for w in writers.values()) - tokens_before,
            consumed - state["reported_bytes"],
        )
        state["reported_bytes"] = consumed
        if delay:
            time.sleep(delay)

    lines = 0
    loads = json.loads
    try:
        for number, offset, raw in source:
            lines += 1
            if len(raw) <= 2 and not raw.strip():
                bad.blank_lines += 1
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                skip("invalid_utf8", number, offset, str(err))
                continue
            try:
                record = loads(line)
            except (ValueError, RecursionError) as err:
                if not line.strip():
                    bad.blank_lines += 1
                    continue
                skip("invalid_json", number, offset, str(err)[:80])
                continue
            if not isinstance(record, dict):
                skip("missing_key", number, offset, f"a JSON {type(record).__name__}, not an object")
                continue
            subset = None
            if split:
                subset = subset_from_record(record) or spec.path_subset
            for k, key in enumerate(keys):
                text = record.get(key)
                if text is None and key not in record:
                    skip("missing_key", number, offset, f"no {key!r}")
                elif not isinstance(text, str):
                    skip("not_string", number, offset, f"{key!r} is {type(text).__name__}")
                elif not text or text.isspace():
                    skip("empty_text", number, offset, f"{key!r} is empty")
                else:
                    texts.append(text)
                    dests.append(((subset, k), number, offset))
                    state["chars"] += len(text)
            if state["chars"] >= ctx.batch_chars:
                flush()
        flush()
        report(0, 0, source.input_bytes - state["reported_bytes"])
        outputs = []
        for meta, w in zip(out_meta, writers.values()):
            w.finish()
            outputs.append({**meta, "documents": w.documents, "tokens": w.tokens})
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    result = {
        "id": spec.id,
        "outputs": outputs,
        "bad": bad.to_json(),
        "lines": lines,
        "input_bytes": spec.input_bytes,
    }
    done = os.path.join(ctx.work_dir, f"{spec.id}.done.json")
    tmp = tmp_name(done)
    with open(tmp, "w") as f:
        json.dump(result, f)
    publish([(tmp, done)], durable=False)
    return result


def _shard_is_intact(work_dir: str, result: dict) -> bool:
    """A finished shard may be reused if its files exist and agree with its recorded counts."""
    try:
        for out in result["outputs"]:
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


def _worker_main(wid: int, parent_pid: int, ctx_args: dict, tasks, results) -> None:
    if not die_with_parent(parent_pid):  # the parent died before we asked
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    current = None
    try:
        tokenizer = build_tokenizer(ctx_args.pop("tokenizer_type"), ctx_args.pop("tokenizer_model"))
        ctx = ShardContext(tokenizer=tokenizer, **ctx_args)
        while True:
            spec = tasks.get()
            if spec is None:
                results.put(("exit", wid))
                return
            current = spec.id
            results.put(("start", wid, spec.id))
            result = process_shard(spec, ctx, lambda d, t, b: results.put(("progress", wid, d, t, b)))
            results.put(("done", wid, result))
    except BaseException as err:  # noqa: BLE001 - everything goes back to the parent
        try:
            import pickle

            pickle.dumps(err)
        except Exception:
            err = RuntimeError(f"{type(err).__name__}: {err}")
        results.put(("error", wid, current, err, traceback.format_exc()))


class _Progress:
    """tqdm bar (documents, tokens, MB/s) on a terminal; else a log line every `interval` seconds."""

    def __init__(self, total_bytes: int, enabled: bool | None, interval: float, log, shards: int) -> None:
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.docs = self.tokens = self.bytes = self.shards_done = 0
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

    def update(self, docs: int, tokens: int, nbytes: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bytes += nbytes
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
                f"progress: {self.shards_done}/{self.shards} shards, {self.bytes / MB:,.1f} MB, "
                f"{self.docs:,} documents, {self.tokens:,} tokens, {self.bytes / MB / secs:.2f} MB/s"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_pool(pending: list[ShardSpec], workers: int, ctx_args: dict, progress: _Progress, on_done) -> None:
    # fork starts a worker in milliseconds (spawn re-imports numpy and the tokenizer: ~0.2 s of CPU
    # each, 5% of a 2-core run on 40 MB); it is safe only while this process has no other thread.
    method = "fork" if sys.platform == "linux" and threading.active_count() == 1 else "spawn"
    mp = multiprocessing.get_context(method)
    tasks, results = mp.Queue(), mp.Queue()
    procs = [
        mp.Process(target=_worker_main, args=(i, os.getpid(), dict(ctx_args), tasks, results), daemon=True)
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    # Only now feed the queue: put() starts a feeder thread, and the workers were forked without it.
    for spec in pending:
        tasks.put(spec)
    for _ in range(workers):
        tasks.put(None)
    progress.begin()
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
        tasks.cancel_join_thread()
        results.cancel_join_thread()


# --------------------------------------------------------------------------------------------------
# the run


@contextlib.contextmanager
def _locked(work_dir: str):
    fd = os.open(os.path.join(work_dir, "lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
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


def _reset_work_dir(work_dir: str) -> None:
    for name in os.listdir(work_dir):
        if name != "lock":
            os.remove(os.path.join(work_dir, name))


def preprocess(cfg: PreprocessConfig, log: Callable[[str], None] | None = print) -> PreprocessSummary:
    """Run (or resume) preprocessing; see the module docstring. Returns the summary."""
    t0 = time.monotonic()
    say = log or (lambda _msg: None)
    if cfg.blend_weighting not in WEIGHTINGS:
        raise ValueError(f"--blend-weighting {cfg.blend_weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
    if not cfg.json_keys:
        raise ValueError("--json-keys needs at least one key")
    if cfg.workers < 1:
        raise ValueError(f"--workers {cfg.workers}: must be at least 1")
    tokenizer = build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model)
    dtype = token_dtype(tokenizer.vocab_size).__name__
    files = expand_inputs_with_roots(cfg.inputs)
    out_dir = os.path.dirname(os.path.abspath(cfg.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    work_dir = os.path.abspath(cfg.output_prefix) + ".shards"
    os.makedirs(work_dir, exist_ok=True)
    settings = _settings(cfg, tokenizer, dtype)

    with _locked(work_dir):
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

        # Reuse finished shards still in the plan; drop everything else (old plans, partial files).
        ids = {s.id for s in shards}
        results: dict[str, dict] = {}
        for name in sorted(os.listdir(work_dir)):
            sid = name.split(".", 1)[0]
            if name.endswith(".done.json") and sid in ids:
                try:
                    with open(os.path.join(work_dir, name)) as f:
                        result = json.load(f)
                except ValueError:
                    continue
                if _shard_is_intact(work_dir, result):
                    results[sid] = result
        for name in os.listdir(work_dir):
            if name in ("lock", "manifest.json"):
                continue
            if name.split(".", 1)[0] not in results:
                os.remove(os.path.join(work_dir, name))
        reused = len(results)
        pending = [s for s in shards if s.id not in results]
        pending_bytes = sum(s.input_bytes for s in pending)
        workers = max(1, min(cfg.workers, len(pending)))
        say(
            f"preprocess: {len(files)} files, {total_bytes / MB:,.1f} MB, {len(shards)} shards of up to "
            f"{shard_size / MB:.3g} MB"
            + (f"; resuming: {reused} shards already done, {len(pending)} to go" if reused else "")
            + (f"; {workers} workers" if pending else "")
        )

        progress = _Progress(pending_bytes, cfg.progress, cfg.log_interval, log, len(pending))

        def on_done(result: dict) -> None:
            results[result["id"]] = result
            progress.shards_done += 1

        ctx_args = {
            "work_dir": work_dir,
            "json_keys": tuple(cfg.json_keys),
            "append_eod": bool(cfg.append_eod),
            "split_by_subset": bool(cfg.split_by_subset),
            "strict": bool(cfg.strict),
            "dtype": dtype,
            "batch_chars": int(cfg.batch_chars),
        }
        try:
            if workers == 1:
                ctx = ShardContext(tokenizer=tokenizer, **ctx_args)
                progress.begin()
                for spec in pending:
                    on_done(process_shard(spec, ctx, progress.update))
            elif pending:
                ctx_args.update(tokenizer_type=cfg.tokenizer_type, tokenizer_model=cfg.tokenizer_model)
                _run_pool(pending, workers, ctx_args, progress, on_done)
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

        # Merge, in plan order, per output.
        bad = BadLineStats()
        lines = 0
        per_output: dict[tuple[str | None, str], dict] = {}
        for spec in shards:
            result = results[spec.id]
            bad.merge(BadLineStats.from_json(result["bad"]))
            lines += result["lines"]
            for out in result["outputs"]:
                entry = per_output.setdefault(
                    (out["subset"], out["key"]), {"stems": [], "documents": 0, "tokens": 0}
                )
                entry["stems"].append(os.path.join(work_dir, out["stem"]))
                entry["documents"] += out["documents"]
                entry["tokens"] += out["tokens"]
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
            say(f"merging {len(entry['stems'])} shard(s) into {prefix}.bin/.idx")
            merge_datasets(entry["stems"], prefix)
            outputs.append(OutputInfo(prefix, subset, key, entry["documents"], entry["tokens"], dtype))

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

    if not cfg.keep_shards:
        shutil.rmtree(work_dir, ignore_errors=True)
    summary = PreprocessSummary(
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
    )
    say(summary.format())
    return summary
