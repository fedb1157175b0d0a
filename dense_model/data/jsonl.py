"""JSON-lines input: finding the files, reading plain/zstd/gzip streams by line, judging each line.

Input forms (what `--input` accepts): files, folders (searched recursively) and globs (`**`
allowed), of `.jsonl` / `.json` files, optionally compressed as `.zst`/`.zstd` or `.gz`, and of
`.parquet` / `.arrow` files (read by `dense_model.data.tables`; their bad rows are judged here too).

Bad lines never stop a run unless asked to: each is skipped and counted under one reason

| reason | the line |
|---|---|
| `invalid_utf8` | is not valid UTF-8 (or its text holds a lone surrogate escape such as `\\ud800`) |
| `invalid_json` | is not JSON |
| `missing_key` | is JSON but not an object holding the key (`--json-keys`) |
| `not_string` | holds the key with a non-string value |
| `empty_text` | holds an empty or whitespace-only string, or one that encodes to no tokens |

Blank lines (only whitespace) are not documents and not errors: they are counted apart.

Plain files can be read in byte ranges: a range [start, end) owns exactly the lines whose first
byte lies inside it, so consecutive ranges cover every line once whatever the boundaries.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from dense_model.data.tables import TABLE_SUFFIXES, damaged_input, is_table

BAD_REASONS = ("invalid_utf8", "invalid_json", "missing_key", "not_string", "empty_text")
MAX_REPORTED_POSITIONS = 5

_JSON_SUFFIXES = (".jsonl", ".json")
_COMPRESSION_SUFFIXES = {".zst": "zst", ".zstd": "zst", ".gz": "gz"}
SUPPORTED_SUFFIXES = (
    *(j + c for j in _JSON_SUFFIXES for c in ("", *_COMPRESSION_SUFFIXES)),
    *TABLE_SUFFIXES,  # Parquet / Arrow, read by dense_model.data.tables
)


class BadLineError(ValueError):
    """A bad line met under --strict. Picklable, so worker processes can send it back."""

    def __init__(self, reason: str, path: str, line: int | None, offset: int, detail: str = "") -> None:
        super().__init__(reason, path, line, offset, detail)
        self.reason, self.path, self.line, self.offset, self.detail = reason, path, line, offset, detail

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else f"{self.path} (byte {self.offset})"
        extra = f" ({self.detail})" if self.detail else ""
        return (
            f"bad input line at {where}: {self.reason}{extra}. Fix or delete the line, or rerun without "
            "--strict to skip and count bad lines."
        )


# --------------------------------------------------------------------------------------------------
# finding inputs


def compression_of(path: str) -> str | None:
    """'zst', 'gz' or None (plain), from the file name."""
    for suffix, kind in _COMPRESSION_SUFFIXES.items():
        if path.endswith(suffix):
            return kind
    return None


def is_supported(path: str) -> bool:
    return path.endswith(SUPPORTED_SUFFIXES)


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files, folders (recursive) and globs -> the list of input files; see `expand_inputs_with_roots`."""
    return [path for path, _ in expand_inputs_with_roots(inputs)]


def expand_inputs_with_roots(inputs: Sequence[str]) -> list[tuple[str, str]]:
    """Files, folders (recursive) and globs -> [(absolute file path, the folder it was found under)].

    The order is the argument order, and inside a folder or glob the sorted path order, so the
    same command always sees the same files in the same order (outputs depend on it). A file met
    twice is kept once. The folder is the `--input` folder for folder arguments, else the file's
    parent; `subset_from_path` looks no higher than it.
    """
    if isinstance(inputs, str):
        inputs = [inputs]
    files: list[tuple[str, str]] = []
    seen: set[str] = set()

    def add(path: str, root: str) -> None:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            files.append((os.path.abspath(path), os.path.abspath(root)))

    for item in inputs:
        if os.path.isdir(item):
            found = []
            for root, dirs, names in os.walk(item, followlinks=True):
                dirs.sort()
                found.extend(os.path.join(root, n) for n in names if is_supported(n))
            if not found:
                raise FileNotFoundError(
                    f"--input {item}: the folder holds no {'/'.join(SUPPORTED_SUFFIXES)} files (searched recursively)."
                )
            for path in sorted(found):
                add(path, item)
        elif os.path.isfile(item):
            if not is_supported(item):
                raise ValueError(
                    f"--input {item}: unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)}."
                )
            add(item, os.path.dirname(os.path.abspath(item)))
        elif glob.has_magic(item):
            matches = sorted(
                p for p in glob.glob(item, recursive=True) if os.path.isfile(p) and is_supported(p)
            )
            if not matches:
                raise FileNotFoundError(
                    f"--input {item}: the pattern matches no {'/'.join(SUPPORTED_SUFFIXES)} files."
                )
            for path in matches:
                add(path, os.path.dirname(os.path.abspath(path)))
        else:
            raise FileNotFoundError(f"--input {item}: no such file, folder or glob match.")
    return files


# --------------------------------------------------------------------------------------------------
# reading lines


class _CountingReader(io.RawIOBase):
    """Raw file wrapper that remembers how many compressed bytes were consumed (for MB/s)."""

    def __init__(self, raw) -> None:
        self._raw = raw
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._raw.readinto(b)
        self.consumed += n or 0
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_compressed(path: str) -> tuple[io.BufferedIOBase, _CountingReader]:
    """Open a whole file as a binary line stream; returns (stream, counter of input bytes read)."""
    raw = _CountingReader(open(path, "rb", buffering=0))
    kind = compression_of(path)
    if kind == "zst":
        import zstandard

        # read_across_frames: files made by concatenating .zst parts are common in dumps.
        reader = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(
            raw, read_across_frames=True, closefd=True
        )
        return io.BufferedReader(reader, buffer_size=1 << 20), raw
    if kind == "gz":
        return io.BufferedReader(
            gzip.GzipFile(fileobj=io.BufferedReader(raw, 1 << 20), mode="rb"), 1 << 20
        ), raw
    return io.BufferedReader(raw, buffer_size=1 << 20), raw


class LineSource:
    """The lines a shard of `path` owns: iterate for (line number or 0, byte offset, line).

    For a compressed file the shard is the whole file (start=0, end=None); offsets are then in the
    decompressed stream. For a plain file, [start, end) owns the lines whose first byte lies in it.
    Line numbers are 1-based and count from the shard's first line: exact for a shard starting at
    byte 0; for later shards the caller adds the lines of the shards before (preprocessing counts
    the lines of every shard, so no file is rescanned). `input_bytes` is how much of the input
    file (compressed bytes for compressed files) has been consumed so far, for MB/s.
    """

    def __init__(self, path: str, start: int = 0, end: int | None = None) -> None:
        self.path, self.start, self.end = path, start, end
        self.compressed = compression_of(path) is not None
        if self.compressed and (start != 0 or end is not None):
            raise ValueError(f"{path}: compressed files are read whole, not in byte ranges")
        self._pos = start
        self._counter: _CountingReader | None = None

    @property
    def input_bytes(self) -> int:
        if self._counter is not None:
            return self._counter.consumed
        end = self._pos if self.end is None else min(self._pos, self.end)
        return max(end - self.start, 0)

    def __iter__(self) -> Iterator[tuple[int, int, bytes]]:
        if self.compressed:
            stream, self._counter = open_compressed(self.path)
            with stream:
                offset, number, lines = 0, 0, iter(stream)
                while True:
                    try:
                        line = next(lines)
                    except StopIteration:
                        return
                    except Exception as err:  # noqa: BLE001 - zstd, gzip and zlib raise their own types
                        raise damaged_input(self.path, err, f"after line {number}") from None
                    number += 1
                    yield number, offset, line
                    offset += len(line)
        with open(self.path, "rb", buffering=1 << 20) as f:
            end = os.fstat(f.fileno()).st_size if self.end is None else self.end
            pos = 0
            if self.start > 0:
                # The line holding byte start-1 belongs to the previous range: skip to its end.
                f.seek(self.start - 1)
                pos = self.start - 1 + len(f.readline())
            number = 1
            readline = f.readline
            while pos < end:
                line = readline()
                if not line:
                    break
                yield number, pos, line
                pos += len(line)
                self._pos = pos
                number += 1


def iter_lines(path: str, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, bytes]]:
    """Shorthand for `iter(LineSource(path, start, end))`."""
    return iter(LineSource(path, start, end))


def absolute_line(path: str, offset: int) -> int:
    """1-based line number of the line starting at byte `offset` of a plain file."""
    count = 0
    with open(path, "rb") as f:
        remaining = offset
        while remaining > 0:
            block = f.read(min(remaining, 16 << 20))
            if not block:
                break
            count += block.count(b"\n")
            remaining -= len(block)
    return count + 1


# --------------------------------------------------------------------------------------------------
# judging lines


@dataclass
class BadLineStats:
    """Counts of skipped lines per reason, and the first few positions (path, line, offset, reason)."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_REASONS, 0))
    positions: list[tuple[str, int | None, int, str]] = field(default_factory=list)
    blank_lines: int = 0

    def add(self, reason: str, path: str, line: int | None, offset: int) -> None:
        """Count a bad line. Positions stay the first ones of each file by offset, even when found out
        of order (a lone surrogate shows only when its batch is encoded, after later lines)."""
        self.counts[reason] += 1
        entry = (path, line or None, offset, reason)
        positions = self.positions
        if len(positions) < MAX_REPORTED_POSITIONS:
            positions.append(entry)
        elif positions[-1][0] == path and offset < positions[-1][2]:
            positions[-1] = entry
        else:
            return
        i = len(positions) - 1  # one insertion-sort step keeps a file's positions in offset order
        while i > 0 and positions[i - 1][0] == path and positions[i - 1][2] > offset:
            positions[i - 1], positions[i] = positions[i], positions[i - 1]
            i -= 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: BadLineStats) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
        room = MAX_REPORTED_POSITIONS - len(self.positions)
        if room > 0:
            self.positions.extend(other.positions[:room])
        self.blank_lines += other.blank_lines

    def to_json(self) -> dict:
        return {
            "counts": self.counts,
            "positions": [list(p) for p in self.positions],
            "blank_lines": self.blank_lines,
        }

    @classmethod
    def from_json(cls, data: dict) -> BadLineStats:
        return cls(
            counts={**dict.fromkeys(BAD_REASONS, 0), **data["counts"]},
            positions=[tuple(p) for p in data["positions"]],
            blank_lines=data.get("blank_lines", 0),
        )

    def shift_lines(self, lines_before: int) -> None:
        """Make shard-relative line numbers absolute: add the lines of the file's earlier shards."""
        self.positions = [(p, (n + lines_before) if n else n, o, r) for p, n, o, r in self.positions]

    def resolved_positions(self) -> list[str]:
        """'path:line (reason)' strings ('path row N' for Parquet/Arrow); a line unknown here is counted now."""
        out = []
        for path, line, offset, reason in self.positions:
            if is_table(path):
                out.append(f"{path} row {line} ({reason})")
                continue
            if line is None:
                line = absolute_line(path, offset)
            out.append(f"{path}:{line} ({reason})")
        return out


# --------------------------------------------------------------------------------------------------
# RedPajama subsets

# Token counts of RedPajama-1T (billions) live in blend.py; these are the names and their aliases.
REDPAJAMA_SUBSETS = ("common_crawl", "c4", "github", "arxiv", "book", "wikipedia", "stackexchange")
_SUBSET_ALIASES = {
    "commoncrawl": "common_crawl",
    "cc": "common_crawl",
    "c4": "c4",
    "github": "github",
    "arxiv": "arxiv",
    "book": "book",
    "books": "book",
    "wikipedia": "wikipedia",
    "wiki": "wikipedia",
    "stackexchange": "stackexchange",
}
# Keys inside `meta` that name the subset: SlimPajama writes meta.redpajama_set_name.
_META_SUBSET_KEYS = ("red_pajama_subset", "redpajama_set_name", "subset")


def normalize_subset(name: str) -> str:
    """'RedPajamaCommonCrawl' / 'common-crawl' / 'cc' -> 'common_crawl'; others -> a safe file-name part."""
    squashed = re.sub(r"[^a-z0-9]", "", name.lower())
    if squashed.startswith("redpajama") and squashed != "redpajama":
        squashed = squashed[len("redpajama") :]
    if squashed in _SUBSET_ALIASES:
        return _SUBSET_ALIASES[squashed]
    safe = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:64]
    return safe or "unknown"


def subset_from_record(record: dict) -> str | None:
    """The subset named by the record itself (`red_pajama_subset`, or inside `meta`), if any."""
    value = record.get("red_pajama_subset")
    if isinstance(value, str) and value:
        return normalize_subset(value)
    meta = record.get("meta")
    if isinstance(meta, str) and meta.startswith("{"):
        # Some RedPajama exports store meta as a JSON string.
        try:
            import json

            meta = json.loads(meta)
        except ValueError:
            meta = None
    if isinstance(meta, dict):
        for key in _META_SUBSET_KEYS:
            value = meta.get(key)
            if isinstance(value, str) and value:
                return normalize_subset(value)
    return None


def subset_from_path(path: str, root: str | None = None) -> str:
    """The subset a file's location implies: a known RedPajama name among its folders from its
    parent up to `root` (the `--input` folder; nearest first), else a known name starting the file
    name (`arxiv_sample.jsonl`, `cc_2023-06_...`), else its parent folder's name."""
    parent = os.path.dirname(os.path.abspath(path))
    root = os.path.abspath(root) if root else parent
    rel = (
        os.path.relpath(parent, os.path.dirname(root))
        if parent == root or parent.startswith(root + os.sep)
        else os.path.basename(parent)
    )
    for part in reversed(rel.split(os.sep)):
        squashed = re.sub(r"[^a-z0-9]", "", part.lower())
        if squashed in _SUBSET_ALIASES:
            return _SUBSET_ALIASES[squashed]
    head = re.split(r"[_\-.]", os.path.basename(path).lower(), maxsplit=1)[0]
    if head in _SUBSET_ALIASES:
        return _SUBSET_ALIASES[head]
    return normalize_subset(os.path.basename(parent))
