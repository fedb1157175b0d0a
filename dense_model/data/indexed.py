"""The Megatron mmap dataset layout (.bin tokens + .idx index), written and merged with bounded memory.

megatron-core's `IndexedDataset` reads what this module writes. The .idx layout (little endian):

    b"MMIDIDX\\x00\\x00" | u64 version=1 | u8 dtype code | u64 S (sequences) | u64 D (= documents + 1)
    | i32[S] sequence lengths | i64[S] byte offsets of the sequences in .bin | i64[D] document indices

Here every document is one sequence (no sentence splitting), so document indices are 0..S.

Why not megatron-core's `IndexedDatasetBuilder`: it keeps every sequence length in a Python list
(about 36 bytes per document instead of 4) and its `add_index` merge extends that list with each
input's whole index, so merging RedPajama-sized datasets needs tens of GB of RAM. `merge_datasets`
streams instead: .bin files are copied in the kernel (`copy_into`), the merged .idx is written in
three passes over memory-mapped input indexes, in chunks of 4M entries (~50 MB). The result is
byte-identical to `IndexedDatasetBuilder.add_index` + `finalize` (tests check this).

Every file is written under a temporary name, then renamed, .bin before .idx: a reader that sees
an .idx under the final name always sees its complete .bin. Final outputs are fsynced before the
rename (`durable=True`, the default); preprocessing's intermediate shard files are not, and are
validated before reuse instead.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
# megatron-core's DType codes (indexed_dataset.DType), kept here so that preprocessing workers do
# not import megatron.core (about 5-10 s of imports per process); tests check they agree.
DTYPE_CODES: dict[type[np.number], int] = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}
_DTYPE_FROM_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}
_PREAMBLE = len(INDEX_HEADER) + 8 + 1 + 8 + 8  # 34 bytes before the arrays
_CHUNK = 1 << 22  # index entries handled at once when streaming (4M: 16-32 MB per array chunk)


def token_dtype(vocab_size: int) -> type[np.number]:
    """uint16 when the vocabulary fits (< 65500), else int32: megatron's `DType.optimal_dtype`."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


# --------------------------------------------------------------------------------------------------
# atomic files


def tmp_name(path: str) -> str:
    """A temporary name next to `path`, unique per process (a killed run leaves it behind, harmlessly)."""
    return f"{path}.tmp.{os.getpid()}"


def fsync_dir(path: str) -> None:
    """Make renames inside a folder durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(pairs: Sequence[tuple[str, str]], durable: bool = True) -> None:
    """Rename each (tmp, final) in order, then (durable) fsync the folders touched."""
    for tmp, final in pairs:
        os.replace(tmp, final)
    if not durable:
        return
    for folder in {os.path.dirname(os.path.abspath(final)) for _, final in pairs}:
        fsync_dir(folder)


def _close(f, durable: bool) -> None:
    f.flush()
    if durable:
        os.fsync(f.fileno())
    f.close()


# --------------------------------------------------------------------------------------------------
# reading an index


@dataclass
class IndexHeader:
    """The fixed part of an .idx file, and memory maps of its arrays on demand."""

    path: str
    dtype: type[np.number]
    sequence_count: int
    document_index_count: int  # entries in the document index, documents + 1
    file_size: int

    @property
    def documents(self) -> int:
        return max(self.document_index_count - 1, 0)

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def expected_size(self) -> int:
        return _PREAMBLE + self.sequence_count * (4 + 8) + self.document_index_count * 8

    def _array(self, dtype, count: int, offset: int) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=(count,))

    def lengths(self) -> np.ndarray:
        return self._array(np.int32, self.sequence_count, _PREAMBLE)

    def pointers(self) -> np.ndarray:
        return self._array(np.int64, self.sequence_count, _PREAMBLE + 4 * self.sequence_count)

    def document_indices(self) -> np.ndarray:
        return self._array(np.int64, self.document_index_count, _PREAMBLE + 12 * self.sequence_count)


def read_index_header(idx_path: str) -> IndexHeader:
    """Parse an .idx header; ValueError naming the file if it is not a Megatron mmap index."""
    with open(idx_path, "rb") as f:
        head = f.read(_PREAMBLE)
        size = os.fstat(f.fileno()).st_size
    if len(head) < _PREAMBLE or head[:9] != INDEX_HEADER:
        raise ValueError(f"{idx_path}: not a Megatron mmap index (.idx): bad or short header")
    version, code, seqs, docs = struct.unpack("<QBQQ", head[9:])
    if version != 1:
        raise ValueError(f"{idx_path}: index version {version}, only version 1 is supported")
    dtype = _DTYPE_FROM_CODE.get(code)
    if dtype is None:
        raise ValueError(f"{idx_path}: unknown token dtype code {code}")
    header = IndexHeader(idx_path, dtype, seqs, docs, size)
    if size < header.expected_size:
        raise ValueError(
            f"{idx_path}: truncated index ({size} bytes, its header needs {header.expected_size}); "
            "the dataset was not finished, regenerate it."
        )
    return header


def bin_size_of(prefix: str, header: IndexHeader) -> int:
    """Bytes of token data the index describes (sum of lengths x itemsize), streamed."""
    lengths = header.lengths()
    total = 0
    for start in range(0, header.sequence_count, _CHUNK):
        total += int(lengths[start : start + _CHUNK].sum(dtype=np.int64))
    return total * header.itemsize


# --------------------------------------------------------------------------------------------------
# writing


def _write_preamble(f, dtype, sequence_count: int, document_index_count: int) -> None:
    f.write(INDEX_HEADER)
    f.write(struct.pack("<Q", 1))
    f.write(struct.pack("<B", DTYPE_CODES[np.dtype(dtype).type]))
    f.write(struct.pack("<Q", sequence_count))
    f.write(struct.pack("<Q", document_index_count))


class DocumentWriter:
    """Appends documents (token id lists) to a new dataset; `finish()` publishes .bin then .idx.

    Memory: the token data goes straight to the file; only the lengths stay (4 bytes a document).
    `durable=False` skips the fsyncs (the renames stay atomic for a killed process, but not for a
    power cut): for intermediate files that are validated before reuse.
    """

    def __init__(self, prefix: str, dtype: type[np.number], durable: bool = True) -> None:
        self.prefix = prefix
        self.durable = durable
        self.dtype = np.dtype(dtype)
        self._bin_tmp = tmp_name(prefix + ".bin")
        self._bin = open(self._bin_tmp, "wb", buffering=8 << 20)
        self._lengths = array("i")
        self.tokens = 0

    @property
    def documents(self) -> int:
        return len(self._lengths)

    def add_documents(self, docs: list[list[int]]) -> None:
        """Append documents; each list is written as given (callers add EOD)."""
        lengths = [len(d) for d in docs]
        n = sum(lengths)
        flat = np.fromiter(chain.from_iterable(docs), dtype=self.dtype, count=n)
        self._bin.write(memoryview(flat))
        self._lengths.extend(lengths)
        self.tokens += n

    def add_flat(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append tokens [n] as they are; `lengths` closes documents (sum may differ from n: a
        document may continue into the next call's tokens, whose lengths then count it)."""
        self._bin.write(memoryview(np.ascontiguousarray(tokens, dtype=self.dtype)))
        self._lengths.extend(np.asarray(lengths, dtype=np.int32).tolist())
        self.tokens += int(tokens.shape[0])

    def finish(self) -> None:
        _close(self._bin, self.durable)
        idx_tmp = tmp_name(self.prefix + ".idx")
        lengths = np.frombuffer(self._lengths, dtype=np.int32) if self._lengths else np.zeros(0, np.int32)
        write_index(idx_tmp, self.dtype.type, lengths, durable=self.durable)
        publish(
            [(self._bin_tmp, self.prefix + ".bin"), (idx_tmp, self.prefix + ".idx")], durable=self.durable
        )

    def abort(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        if os.path.exists(self._bin_tmp):
            os.remove(self._bin_tmp)


def write_index(idx_path: str, dtype, lengths: np.ndarray, durable: bool = True) -> None:
    """Write (and, if durable, fsync) an .idx for one-sequence-per-document data with these lengths."""
    lengths = np.asarray(lengths, dtype=np.int32)
    count = lengths.shape[0]
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(count, dtype=np.int64)
    if count > 1:
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= itemsize
    with open(idx_path, "wb") as f:
        _write_preamble(f, dtype, count, count + 1)
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(np.arange(count + 1, dtype=np.int64).tobytes(order="C"))
        f.flush()
        if durable:
            os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------------
# merging


@dataclass
class MergeResult:
    prefix: str
    dtype: type[np.number]
    documents: int
    sequences: int
    tokens: int


def find_dataset_prefixes(folder: str) -> list[str]:
    """Every .bin/.idx pair in a folder (not recursive), sorted by name, like Megatron's merge tool.

    A lone .bin or .idx is an error: it usually means an unfinished dataset.
    """
    names = sorted(os.listdir(folder))
    stems = sorted({n[:-4] for n in names if n.endswith((".bin", ".idx"))})
    prefixes = []
    for stem in stems:
        has_bin, has_idx = f"{stem}.bin" in names, f"{stem}.idx" in names
        if has_bin != has_idx:
            missing = f"{stem}.idx" if has_bin else f"{stem}.bin"
            raise FileNotFoundError(
                f"{os.path.join(folder, missing)} is missing: every dataset needs both .bin and .idx "
                "(an unfinished dataset? regenerate it or move the lone file out of the folder)."
            )
        prefixes.append(os.path.join(folder, stem))
    if not prefixes:
        raise FileNotFoundError(f"{folder}: no .bin/.idx datasets to merge")
    return prefixes


def copy_into(out, path: str) -> int:
    """Append the file at `path` to the unbuffered binary file `out`; returns the bytes copied.

    `os.copy_file_range` copies inside the kernel (no trip through user space; filesystems that
    share extents, e.g. XFS/Btrfs, may even reflink); where it is missing or refused (another
    filesystem, old kernels) the rest is copied through a 16 MB buffer."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        copied = 0
        try:
            while copied < size:
                n = os.copy_file_range(f.fileno(), out.fileno(), size - copied)
                if n == 0:
                    break
                copied += n
        except (AttributeError, OSError) as err:
            if isinstance(err, OSError) and err.errno not in (
                errno.EXDEV,
                errno.ENOSYS,
                errno.EINVAL,
                errno.EOPNOTSUPP,
                errno.EBADF,
                errno.EPERM,
            ):
                raise
        if copied < size:
            f.seek(copied)
            shutil.copyfileobj(f, out, 16 << 20)
    return size


def merge_datasets(
    input_prefixes: Sequence[str], output_prefix: str, on_copied: Callable[[int], None] | None = None
) -> MergeResult:
    """Concatenate datasets in the given order into `output_prefix`.bin/.idx (Megatron merge semantics:
    the sequences and documents of each input follow those of the previous ones; token dtypes must
    agree). Streams: memory stays bounded whatever the sizes. Outputs are published atomically.
    `on_copied(nbytes)` is called after each input's tokens are copied (for progress)."""
    if not input_prefixes:
        raise ValueError("merge_datasets: no input datasets given")
    out_real = {os.path.realpath(output_prefix + ext) for ext in (".bin", ".idx")}
    headers = []
    for prefix in input_prefixes:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise FileNotFoundError(f"{prefix}{ext} is missing: every dataset needs both .bin and .idx")
            if os.path.realpath(prefix + ext) in out_real:
                raise ValueError(
                    f"--output-prefix {output_prefix} is also an input; choose a new output prefix"
                )
        header = read_index_header(prefix + ".idx")
        expected = bin_size_of(prefix, header)
        actual = os.path.getsize(prefix + ".bin")
        if actual != expected:
            raise ValueError(
                f"{prefix}.bin has {actual} bytes but {prefix}.idx describes {expected}: the pair is "
                "inconsistent (an interrupted write?); regenerate this dataset."
            )
        headers.append(header)
    dtype = headers[0].dtype
    for prefix, header in zip(input_prefixes, headers):
        if header.dtype != dtype:
            raise ValueError(
                f"cannot merge {input_prefixes[0]} ({np.dtype(dtype).name}) with {prefix} "
                f"({np.dtype(header.dtype).name}): token dtypes differ (different tokenizers?)"
            )
    itemsize = np.dtype(dtype).itemsize
    total_seqs = sum(h.sequence_count for h in headers)
    total_doc_entries = 1 + sum(h.documents for h in headers)

    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    bin_tmp, idx_tmp = tmp_name(output_prefix + ".bin"), tmp_name(output_prefix + ".idx")
    try:
        with open(bin_tmp, "wb", buffering=0) as out:
            for prefix in input_prefixes:
                copied = copy_into(out, prefix + ".bin")
                if on_copied is not None:
                    on_copied(copied)
            # Whichever way the bytes went (copy_file_range or the copyfileobj fallback), all of them.
            expected_bytes = sum(os.path.getsize(prefix + ".bin") for prefix in input_prefixes)
            if out.tell() != expected_bytes:
                raise OSError(
                    f"{bin_tmp}: {out.tell():,} bytes written of the inputs' {expected_bytes:,} (disk full?)"
                )
            os.fsync(out.fileno())
        tokens = 0
        with open(idx_tmp, "wb", buffering=16 << 20) as out:
            _write_preamble(out, dtype, total_seqs, total_doc_entries)
            for header in headers:  # pass 1: lengths
                lengths = header.lengths()
                for start in range(0, header.sequence_count, _CHUNK):
                    out.write(np.ascontiguousarray(lengths[start : start + _CHUNK]).tobytes())
            offset = 0  # pass 2: byte pointers, recomputed from the lengths as megatron's writer does
            for header in headers:
                lengths = header.lengths()
                for start in range(0, header.sequence_count, _CHUNK):
                    chunk = np.asarray(lengths[start : start + _CHUNK], dtype=np.int64)
                    pointers = np.empty_like(chunk)
                    pointers[0] = 0
                    np.cumsum(chunk[:-1], out=pointers[1:])
                    out.write(((pointers + offset) * itemsize).tobytes())
                    offset += int(chunk.sum())
            tokens = offset
            out.write(np.zeros(1, dtype=np.int64).tobytes())  # pass 3: document indices
            seq_offset = 0
            for header in headers:
                doc_idx = header.document_indices()
                for start in range(1, header.document_index_count, _CHUNK):
                    out.write(
                        (np.asarray(doc_idx[start : start + _CHUNK], dtype=np.int64) + seq_offset).tobytes()
                    )
                seq_offset += header.sequence_count
            out.flush()
            os.fsync(out.fileno())
        publish([(bin_tmp, output_prefix + ".bin"), (idx_tmp, output_prefix + ".idx")])
    except BaseException:
        for tmp in (bin_tmp, idx_tmp):
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    return MergeResult(output_prefix, dtype, total_doc_entries - 1, total_seqs, tokens)
