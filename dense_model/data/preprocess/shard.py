"""One shard, tokenised into its own datasets (in a worker process, or inline with --workers 1)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from dense_model.data.indexed import DocumentWriter, publish, read_index_header, tmp_name
from dense_model.data.jsonl import BadLineError, BadLineStats, LineSource, subset_from_record
from dense_model.data.preprocess.plan import ShardSpec
from dense_model.data.tables import SUBSET_COLUMNS, iter_table_rows
from dense_model.data.tokenizers import Tokenizer


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
            # intact (renames are atomic); after a power cut `shard_is_intact` rejects damaged ones.
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


def shard_is_intact(work_dir: str, result: dict, published: set[tuple[str | None, str]]) -> bool:
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
