"""Fixtures for the data tests: small JSON-lines corpora (plain, zstd, gzip) made from Python's docs."""

from __future__ import annotations

import gzip
import json
import os

import pytest
import zstandard

# Non-ASCII documents: multi-byte UTF-8 must survive reading, chunking and encoding.
UNICODE_DOCS = [
    "Café, naïve, façade: accents in English loanwords.",
    "日本語のテキストも正しく処理されるべきです。",
    "Emoji 🎉🐍 and math ∑ ∫ √ in one line.",
    "Привет, мир! Ελληνικά κείμενα.",
]


def corpus_texts(n: int = 240) -> list[str]:
    """n documents of 1-3 pydoc-topic paragraphs each, some with newlines, some non-ASCII."""
    import pydoc_data.topics

    paragraphs = [
        p.strip()
        for body in pydoc_data.topics.topics.values()
        for p in body.split("\n\n")
        if len(p.strip()) > 40
    ]
    docs = []
    for i in range(n):
        if i % 37 == 5:
            docs.append(UNICODE_DOCS[(i // 37) % len(UNICODE_DOCS)])
            continue
        k = 1 + i % 3
        docs.append("\n\n".join(paragraphs[(i * 3 + j) % len(paragraphs)] for j in range(k)))
    return docs


def write_jsonl(path: str, lines: list[bytes | str | dict], compression: str | None = None) -> str:
    """Write lines (dicts are JSON-encoded, bytes written raw) to path, compressed as asked."""
    data = b"".join(
        (
            json.dumps(x, ensure_ascii=False).encode()
            if isinstance(x, dict)
            else x.encode()
            if isinstance(x, str)
            else x
        )
        + b"\n"
        for x in lines
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if compression == "zst":
        data = zstandard.ZstdCompressor(level=3).compress(data)
    elif compression == "gz":
        data = gzip.compress(data, mtime=0)
    with open(path, "wb") as f:
        f.write(data)
    return path


SUFFIX = {None: ".jsonl", "zst": ".jsonl.zst", "gz": ".json.gz"}


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return corpus_texts()


@pytest.fixture(scope="session")
def corpora(tmp_path_factory, texts) -> dict:
    """{compression: folder} holding the same documents split over 3 files, for None/'zst'/'gz'."""
    root = tmp_path_factory.mktemp("corpora")
    out = {}
    thirds = [texts[0:80], texts[80:160], texts[160:]]
    for compression in (None, "zst", "gz"):
        folder = root / (compression or "plain")
        for i, part in enumerate(thirds):
            records = [{"text": t, "meta": {"i": j}} for j, t in enumerate(part)]
            write_jsonl(str(folder / f"part_{i}{SUFFIX[compression]}"), records, compression)
        out[compression] = str(folder)
    return out


@pytest.fixture(scope="session")
def sp(spm_model):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=spm_model)


def read_dataset(prefix: str) -> list[list[int]]:
    """Every document of a dataset, through megatron-core's own reader."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def file_bytes(prefix: str) -> tuple[bytes, bytes]:
    with open(prefix + ".bin", "rb") as b, open(prefix + ".idx", "rb") as i:
        return b.read(), i.read()


@pytest.fixture(scope="session")
def data_helpers():
    """The helper functions above, for tests (conftest modules are not imported directly)."""

    class Helpers:
        write_jsonl = staticmethod(write_jsonl)
        read_dataset = staticmethod(read_dataset)
        file_bytes = staticmethod(file_bytes)
        corpus_texts = staticmethod(corpus_texts)
        suffix = SUFFIX

    return Helpers
