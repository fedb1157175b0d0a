"""dense_model.data.indexed: the .idx layout and the streaming merge, against megatron-core itself."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from dense_model.data.indexed import (
    DTYPE_CODES,
    DocumentWriter,
    find_dataset_prefixes,
    merge_datasets,
    read_index_header,
    token_dtype,
)


def _docs(seed: int, n: int, high: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, size=int(rng.integers(1, 50))).tolist() for _ in range(n)]


def _write(prefix: str, docs, dtype=np.uint16) -> None:
    w = DocumentWriter(prefix, dtype)
    w.add_documents(docs[: len(docs) // 2])
    w.add_documents(docs[len(docs) // 2 :])
    w.finish()


def _megatron_write(prefix: str, docs, dtype=np.uint16) -> None:
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs:
        b.add_document(torch.tensor(d), [len(d)])
    b.finalize(prefix + ".idx")


def _bytes(prefix):
    return open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()


def test_dtype_rules_match_megatron():
    for dtype, code in DTYPE_CODES.items():
        assert DType.code_from_dtype(dtype) == code
    for vocab in (512, 32000, 65499, 65500, 128256):
        assert token_dtype(vocab) == DType.optimal_dtype(vocab)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_writer_is_byte_identical_to_megatron_builder(tmp_path, dtype):
    docs = _docs(0, 40, 60000)
    _write(str(tmp_path / "ours"), docs, dtype)
    _megatron_write(str(tmp_path / "theirs"), docs, dtype)
    assert _bytes(str(tmp_path / "ours")) == _bytes(str(tmp_path / "theirs"))
    ds = IndexedDataset(str(tmp_path / "ours"))
    assert [ds[i].tolist() for i in range(len(ds))] == docs


def test_merge_is_byte_identical_to_megatron_add_index(tmp_path):
    parts = [_docs(i, n, 500) for i, n in enumerate((7, 1, 30))]
    prefixes = []
    for i, docs in enumerate(parts):
        prefixes.append(str(tmp_path / f"part{i}"))
        _write(prefixes[-1], docs)
    b = IndexedDatasetBuilder(str(tmp_path / "meg.bin"), dtype=np.uint16)
    for p in prefixes:
        b.add_index(p)
    b.finalize(str(tmp_path / "meg.idx"))
    result = merge_datasets(prefixes, str(tmp_path / "ours"))
    assert _bytes(str(tmp_path / "ours")) == _bytes(str(tmp_path / "meg"))
    assert (result.documents, result.tokens) == (38, sum(len(d) for p in parts for d in p))
    assert not [n for n in os.listdir(tmp_path) if ".tmp." in n]


def test_merge_streams_in_chunks(tmp_path, monkeypatch):
    import dense_model.data.indexed as indexed

    monkeypatch.setattr(indexed, "_CHUNK", 3)  # many chunks per input, still the same bytes
    parts = [_docs(10 + i, 11, 300) for i in range(2)]
    prefixes = [str(tmp_path / f"p{i}") for i in range(2)]
    for p, docs in zip(prefixes, parts):
        _write(p, docs)
    merge_datasets(prefixes, str(tmp_path / "small_chunks"))
    monkeypatch.setattr(indexed, "_CHUNK", 1 << 22)
    merge_datasets(prefixes, str(tmp_path / "big_chunks"))
    assert _bytes(str(tmp_path / "small_chunks")) == _bytes(str(tmp_path / "big_chunks"))


def test_merge_refuses_bad_inputs(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _write(a, _docs(1, 5, 100), np.uint16)
    _write(b, _docs(2, 5, 100), np.int32)
    with pytest.raises(ValueError, match="dtypes differ"):
        merge_datasets([a, b], str(tmp_path / "o"))
    with pytest.raises(ValueError, match="also an input"):
        merge_datasets([a], a)
    with open(a + ".bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="inconsistent"):
        merge_datasets([a], str(tmp_path / "o"))
    os.remove(b + ".idx")
    with pytest.raises(FileNotFoundError, match=r"b\.idx is missing"):
        find_dataset_prefixes(str(tmp_path))


def test_truncated_index_is_reported(tmp_path):
    p = str(tmp_path / "t")
    _write(p, _docs(3, 10, 100))
    with open(p + ".idx", "r+b") as f:
        f.truncate(60)
    with pytest.raises(ValueError, match="truncated index"):
        read_index_header(p + ".idx")


def test_merge_through_the_copyfileobj_fallback_checks_the_merged_size(tmp_path, monkeypatch):
    import errno
    import shutil

    import dense_model.data.indexed as indexed

    prefixes = []
    for i, n in enumerate((5, 9)):
        prefixes.append(str(tmp_path / f"part{i}"))
        _write(prefixes[-1], _docs(i, n, 500))
    merge_datasets(prefixes, str(tmp_path / "kernel"))

    def refused(*_args):  # as on a filesystem without copy_file_range between these files
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(indexed.os, "copy_file_range", refused)
    merge_datasets(prefixes, str(tmp_path / "fallback"))
    assert _bytes(str(tmp_path / "fallback")) == _bytes(str(tmp_path / "kernel"))

    def short(src, dst, length):  # a copy that stops early (a full disk the write did not report)
        dst.write(src.read()[:-2])

    monkeypatch.setattr(shutil, "copyfileobj", short)
    with pytest.raises(OSError, match="bytes written of the inputs"):
        merge_datasets(prefixes, str(tmp_path / "short"))
    assert not [n for n in os.listdir(tmp_path) if n.startswith("short")], "nothing published, no temporary"
