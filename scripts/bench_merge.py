"""The last step of preprocessing, measured: merging shard datasets against `cp` of the same bytes.

    python scripts/bench_merge.py --gb 2 --shards 64 --dir /tmp/bench_merge

Writes --shards shard datasets (random uint16 tokens, documents of 200-4000 tokens) holding --gb GB
of tokens in all, then times, one after the other and twice each:

* `cp` of every shard .bin into one folder, then `sync` of the copies (the merge fsyncs its output);
* `merge_datasets` of all shards into one dataset (.bin by `os.copy_file_range`, .idx streamed);
* the same merge with the .bin appended through user space (`shutil.copyfileobj`, 16 MB buffer),
  the way the merge copied before.

The shards fit in the page cache on most machines, so reads come from memory for all three: the
numbers compare the copying itself and the writing, not the disk's read speed. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dense_model.data import indexed  # noqa: E402

GB = 1_000_000_000


def make_shards(folder: Path, total_bytes: int, shards: int) -> list[str]:
    rng = np.random.default_rng(0)
    prefixes = []
    per_shard = total_bytes // shards // 2  # uint16 tokens
    for i in range(shards):
        prefix = str(folder / f"shard_{i:04d}")
        lengths = []
        left = per_shard
        while left > 0:
            n = min(int(rng.integers(200, 4000)), left)
            lengths.append(n)
            left -= n
        with open(prefix + ".bin", "wb") as f:
            for start in range(0, per_shard, 1 << 26):
                f.write(rng.integers(0, 65000, min(1 << 26, per_shard - start), dtype=np.uint16).tobytes())
        indexed.write_index(prefix + ".idx", np.uint16, np.array(lengths, dtype=np.int32))
        prefixes.append(prefix)
    return prefixes


def user_space_copy(out, path: str) -> int:
    with open(path, "rb") as f:
        shutil.copyfileobj(f, out, 16 << 20)
    return os.path.getsize(path)


def time_cp(prefixes: list[str], dest: Path) -> float:
    dest.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    subprocess.run(["cp", *[p + ".bin" for p in prefixes], str(dest)], check=True)
    subprocess.run(["sync", *[str(dest / (Path(p).name + ".bin")) for p in prefixes]], check=True)
    seconds = time.perf_counter() - t0
    shutil.rmtree(dest)
    return seconds


def time_merge(prefixes: list[str], out: str, kernel: bool) -> float:
    t0 = time.perf_counter()
    if kernel:
        indexed.merge_datasets(prefixes, out)
    else:
        with mock.patch.object(indexed, "copy_into", user_space_copy):
            indexed.merge_datasets(prefixes, out)
    seconds = time.perf_counter() - t0
    for ext in (".bin", ".idx"):
        os.remove(out + ext)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=2.0, help="GB of tokens in all shards")
    p.add_argument("--shards", type=int, default=64)
    p.add_argument("--dir", default="/tmp/bench_merge", help="scratch folder (needs about 3x --gb free)")
    args = p.parse_args()
    folder = Path(args.dir)
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "shards").mkdir(parents=True)
    total = int(args.gb * GB)
    prefixes = make_shards(folder / "shards", total, args.shards)
    nbytes = sum(os.path.getsize(p + ".bin") for p in prefixes)
    runs: dict[str, list[float]] = {
        "cp + sync (the .bin files)": [],
        "merge, copy_file_range": [],
        "merge, user space": [],
    }
    for _ in range(2):
        runs["cp + sync (the .bin files)"].append(time_cp(prefixes, folder / "cp"))
        runs["merge, copy_file_range"].append(time_merge(prefixes, str(folder / "merged"), kernel=True))
        runs["merge, user space"].append(time_merge(prefixes, str(folder / "merged"), kernel=False))
    shutil.rmtree(folder, ignore_errors=True)
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, {platform.platform()}; date: {time.strftime('%c %Z')}"
    )
    print(f"shards: {args.shards}, {nbytes / GB:.2f} GB of tokens")
    print("| | seconds (run 1, run 2) | GB/s (best) |")
    print("|---|---|---|")
    for name, secs in runs.items():
        print(f"| {name} | {secs[0]:.2f}, {secs[1]:.2f} | {nbytes / GB / min(secs):.2f} |")


if __name__ == "__main__":
    main()
