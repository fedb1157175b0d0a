"""dense_model.data.jsonl: input discovery, readers, byte-range shards, subsets."""

from __future__ import annotations

import os
import random

import pytest

from dense_model.data.jsonl import (
    BadLineStats,
    LineSource,
    absolute_line,
    expand_inputs,
    normalize_subset,
    subset_from_path,
    subset_from_record,
)


def test_byte_ranges_own_every_line_exactly_once(tmp_path):
    rng = random.Random(0)
    lines = [("x" * rng.randrange(0, 40) + "é" * rng.randrange(0, 3)).encode() + b"\n" for _ in range(300)]
    lines[-1] = lines[-1].rstrip(b"\n")  # no newline at the end of the file
    data = b"".join(lines)
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    for chunk in (1, 2, 3, 7, 16, 50, 333, len(data), len(data) + 5):
        got = []
        for start in range(0, len(data), chunk):
            end = min(start + chunk, len(data))
            for number, offset, line in LineSource(str(path), start, end):
                assert data[offset : offset + len(line)] == line
                if start == 0:
                    assert number == len(got) + 1
                got.append(line)
        assert got == lines, f"chunk size {chunk}"


def test_bad_line_positions_keep_the_first_by_offset():
    stats = BadLineStats()
    for offset in (50, 10, 70, 20, 30, 5, 60, 1):  # out of order, as batch encoding finds them
        stats.add("invalid_json", "f.jsonl", None, offset)
    stats.add("not_string", "g.jsonl", 3, 0)
    assert [p[2] for p in stats.positions] == [1, 5, 10, 20, 30]
    assert stats.total == 9 and stats.counts["not_string"] == 1


def test_absolute_line(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"a\nbb\n\nccc\n")
    assert [absolute_line(str(path), o) for o in (0, 2, 5, 6)] == [1, 2, 3, 4]


@pytest.mark.parametrize("compression", ["zst", "gz"])
def test_compressed_files_are_read_whole_with_line_numbers(tmp_path, data_helpers, compression):
    path = data_helpers.write_jsonl(
        str(tmp_path / f"f.jsonl.{compression}"), [f'{{"i": {i}}}' for i in range(1000)], compression
    )
    source = LineSource(path)
    rows = list(source)
    assert [n for n, _, _ in rows] == list(range(1, 1001))
    assert rows[7][2] == b'{"i": 7}\n'
    assert source.input_bytes == os.path.getsize(path)
    with pytest.raises(ValueError, match="read whole"):
        LineSource(path, 10, 20)


def test_expand_inputs_files_folders_globs(tmp_path, data_helpers):
    for rel in ("b/2.jsonl", "a/1.jsonl.zst", "a/deep/3.json.gz", "a/skip.txt", "c.jsonl"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    got = expand_inputs([str(tmp_path / "a"), str(tmp_path / "*.jsonl"), str(tmp_path / "a" / "1.jsonl.zst")])
    assert [os.path.relpath(p, tmp_path) for p in got] == ["a/1.jsonl.zst", "a/deep/3.json.gz", "c.jsonl"]
    assert len(expand_inputs([str(tmp_path / "**" / "*.jsonl")])) == 2
    with pytest.raises(FileNotFoundError, match="--input"):
        expand_inputs([str(tmp_path / "nothing*.jsonl")])
    with pytest.raises(ValueError, match="unsupported"):
        expand_inputs([str(tmp_path / "a" / "skip.txt")])


def test_subsets():
    assert normalize_subset("RedPajamaCommonCrawl") == "common_crawl"
    assert normalize_subset("RedPajamaStackExchange") == "stackexchange"
    assert normalize_subset("books") == "book"
    assert normalize_subset("My Own/Set") == "my_own_set"
    assert (
        subset_from_record({"red_pajama_subset": "arxiv", "meta": {"redpajama_set_name": "RedPajamaBook"}})
        == "arxiv"
    )
    assert subset_from_record({"meta": {"redpajama_set_name": "RedPajamaBook"}}) == "book"
    assert subset_from_record({"meta": '{"redpajama_set_name": "RedPajamaC4"}'}) == "c4"
    assert subset_from_record({"meta": {"url": "x"}}) is None
    assert subset_from_path("/data/rp/common_crawl/2019-30/en_head.jsonl.zst", "/data/rp") == "common_crawl"
    assert subset_from_path("/data/sample/arxiv_sample.jsonl", "/data/sample") == "arxiv"
    assert (
        subset_from_path("/home/wiki/corpus/mine/x.jsonl", "/home/wiki/corpus") == "mine"
    )  # not above --input
