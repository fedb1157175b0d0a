"""Columnar input: Parquet files and Arrow files (Hugging Face `datasets` caches and `save_to_disk`
folders), cut into row ranges and read in bounded record batches with pyarrow.

A shard of a table is a row range [start, end). For Parquet the ranges follow row groups (a row
group is the unit Parquet compresses and reads, so a shard is one or more whole groups of about
`shard_size` compressed bytes). An Arrow file is memory-mapped (pages come from the page cache,
nothing is copied onto the heap) and cut into ranges of about `shard_size` bytes.

Rows become the same dicts a JSON line would (`{"text": ..., "meta": {...}}`), with only the
columns preprocessing needs, so keys, subsets and bad-row reasons work as for JSON lines; a row's
number is its 1-based position in the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

TABLE_SUFFIXES = (".parquet", ".arrow")
BATCH_ROWS = 1024  # rows per record batch read: ~1-10 MB of text for web documents
SUBSET_COLUMNS = ("red_pajama_subset", "meta")  # what subset_from_record looks at


def damaged_input(path: str, err: BaseException, where: str = "") -> ValueError:
    """The one-line error for an input file that cannot be decoded (a truncated or damaged .zst/.gz,
    a file that is not the Parquet/Arrow its name says): path, where, the decoder's words, the fix."""
    words = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    at = f" {where}" if where else ""
    return ValueError(
        f"{path}: cannot be read{at} ({type(err).__name__}: {words}); the file is damaged or not what its "
        "name says: fetch it again, or leave it out of --input (rerun the same command: finished shards are kept)"
    )


def is_table(path: str) -> bool:
    return path.endswith(TABLE_SUFFIXES)


def _arrow_table(path: str) -> pa.Table:
    """The whole Arrow file as a table over a memory map (zero-copy). `datasets` writes the IPC
    stream format; the IPC file format is accepted too."""
    source = pa.memory_map(path, "r")
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowException as err:
            raise damaged_input(path, err) from None


def _parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except pa.ArrowException as err:
        raise damaged_input(path, err) from None


def table_ranges(path: str, shard_size: int) -> list[tuple[int, int, int]]:
    """[(start row, end row, approximate input bytes)] covering the file, each about shard_size bytes."""
    if path.endswith(".parquet"):
        meta = _parquet(path).metadata
        ranges, start, rows, size = [], 0, 0, 0
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            rows += group.num_rows
            size += group.total_byte_size
            if size >= shard_size or g == meta.num_row_groups - 1:
                ranges.append((start, start + rows, size))
                start, rows, size = start + rows, 0, 0
        return ranges
    total_rows = _arrow_table(path).num_rows
    file_size = max(os.path.getsize(path), 1)
    step = max(1, int(total_rows * shard_size / file_size))
    return [
        (s, min(s + step, total_rows), file_size * (min(s + step, total_rows) - s) // max(total_rows, 1))
        for s in range(0, total_rows, step)
    ]


def columns_of(path: str) -> list[str]:
    if path.endswith(".parquet"):
        return list(_parquet(path).schema_arrow.names)
    return list(_arrow_table(path).schema.names)


def iter_table_rows(
    path: str, start: int, end: int, columns: Sequence[str]
) -> Iterator[tuple[int, list[dict]]]:
    """Yield (number of the first row, rows as dicts) batch by batch for rows [start, end), with only
    the `columns` the file has. Memory: one batch of rows."""
    wanted = [c for c in columns if c in set(columns_of(path))]
    if path.endswith(".parquet"):
        pf = _parquet(path)
        groups, first = [], 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if start <= first < end:
                groups.append(g)
            first += n
        batches = pf.iter_batches(batch_size=BATCH_ROWS, row_groups=groups, columns=wanted)
    else:
        table = _arrow_table(path).select(wanted).slice(start, end - start)
        batches = table.to_batches(max_chunksize=BATCH_ROWS)
    number = start + 1
    batches = iter(batches)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except pa.ArrowException as err:  # a damaged row group or page
            raise damaged_input(path, err, f"at row {number}") from None
        rows = batch.to_pylist() if wanted else [{} for _ in range(batch.num_rows)]
        yield number, rows
        number += len(rows)


def hf_dataset_files(name: str, split: str) -> list[str]:
    """The Arrow cache files of a Hugging Face dataset split (a hub name already in the local cache,
    or a local dataset folder), found offline: `datasets.load_dataset` in offline mode attempts no
    download and reuses the cached Arrow files."""
    import datasets  # heavy (~1 s to import); only for --hf-dataset

    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; one message for all
        first = str(err).splitlines()[0] if str(err) else ""
        raise FileNotFoundError(
            f"--hf-dataset {name} --hf-split {split}: not found in the local Hugging Face cache "
            f"({type(err).__name__}: {first}); download it first on a machine with network access, or "
            "pass a save_to_disk folder or Parquet files as --input."
        ) from err
    finally:
        datasets.config.HF_HUB_OFFLINE = offline
    if getattr(ds, "_indices", None) is not None:
        raise ValueError(
            f"--hf-dataset {name}: the cached split has an indices mapping; save_to_disk it first"
        )
    return [f["filename"] for f in ds.cache_files]
