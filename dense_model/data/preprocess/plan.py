"""Planning: the input files, their shards (`ShardSpec`), the order shards are handed out in, and
the names of the outputs. Depends only on the inputs and the shard size."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from dense_model.data.jsonl import compression_of, expand_inputs_with_roots, subset_from_path
from dense_model.data.preprocess.config import MB, PreprocessConfig
from dense_model.data.tables import hf_dataset_files, is_table, table_ranges


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


def input_files(cfg: PreprocessConfig) -> list[tuple[str, str]]:
    files = expand_inputs_with_roots(cfg.inputs) if cfg.inputs else []
    if cfg.hf_dataset:
        files += [(path, os.path.dirname(path)) for path in hf_dataset_files(cfg.hf_dataset, cfg.hf_split)]
    if not files:
        raise ValueError("no input: give --input files/folders/globs or --hf-dataset NAME")
    return files


def dispatch_order(shards: Sequence[ShardSpec], by_subset: bool) -> list[ShardSpec]:
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


def shard_plan_hash(shards: Sequence[ShardSpec]) -> str:
    return hashlib.sha1("\n".join(s.id for s in shards).encode()).hexdigest()
