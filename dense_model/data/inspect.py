"""Look inside a Megatron mmap dataset and check that its .bin and .idx agree.

    python toolkits/pretrain_data_preprocessing/inspect_dataset.py out/red_text_document \\
        --tokenizer-type sentencepiece --tokenizer-model tok.model --samples 3

Reports documents, sequences, tokens, dtype, document lengths, the share of documents ending
with EOD, and a few decoded samples. Checks (streamed, bounded memory): the index header and size,
byte pointers against lengths, document indices, .bin size against the index, token ids against
the vocabulary (sampled documents, or every token with `full_scan`), and that megatron-core's
own `IndexedDataset` opens it and reads the same tokens.
"""

from __future__ import annotations

import os

import numpy as np

from dense_model.data.indexed import _CHUNK, read_index_header

MAX_EOD_CHECKED = 1_000_000  # documents whose last token is read for the EOD share


def _strip_suffix(prefix: str) -> str:
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            return prefix[: -len(ext)]
    return prefix


def inspect_dataset(
    prefix: str, tokenizer=None, *, samples: int = 3, sample_chars: int = 300, full_scan: bool = False
) -> dict:
    """Stats, problems (an empty list when consistent) and decoded samples of a dataset."""
    prefix = _strip_suffix(prefix)
    problems: list[str] = []
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise FileNotFoundError(
                f"{prefix}{ext} does not exist (give the dataset prefix, without .bin/.idx)"
            )
    header = read_index_header(prefix + ".idx")
    itemsize = header.itemsize
    n = header.sequence_count
    if header.file_size != header.expected_size:
        problems.append(
            f".idx is {header.file_size} bytes, its header implies {header.expected_size}"
            + (" (multimodal or corrupt)" if header.file_size > header.expected_size else "")
        )
    lengths, pointers, doc_idx = header.lengths(), header.pointers(), header.document_indices()

    tokens = 0
    min_len, max_len = None, 0
    expected_ptr = 0
    for start in range(0, n, _CHUNK):
        chunk = np.asarray(lengths[start : start + _CHUNK], dtype=np.int64)
        if (chunk < 0).any():
            problems.append(f"negative sequence lengths near sequence {start}")
            break
        ptr = np.empty_like(chunk)
        ptr[0] = 0
        np.cumsum(chunk[:-1], out=ptr[1:])
        ptr = (ptr + expected_ptr) * itemsize
        bad = np.nonzero(np.asarray(pointers[start : start + _CHUNK]) != ptr)[0]
        if bad.size:
            problems.append(
                f"byte pointer of sequence {start + int(bad[0])} disagrees with the lengths before it"
            )
            break
        expected_ptr += int(chunk.sum())
        min_len = int(chunk.min()) if min_len is None else min(min_len, int(chunk.min()))
        max_len = max(max_len, int(chunk.max()))
    tokens = expected_ptr

    if header.document_index_count == 0 or int(doc_idx[0]) != 0:
        problems.append("document indices do not start at 0")
    elif int(doc_idx[-1]) != n:
        problems.append(f"last document index is {int(doc_idx[-1])}, expected the sequence count {n}")
    else:
        for start in range(0, header.document_index_count, _CHUNK):
            chunk = np.asarray(doc_idx[max(start - 1, 0) : start + _CHUNK])
            if (np.diff(chunk) < 0).any():
                problems.append("document indices decrease")
                break

    bin_size = os.path.getsize(prefix + ".bin")
    if bin_size != tokens * itemsize:
        problems.append(
            f".bin is {bin_size} bytes but the index describes {tokens * itemsize} ({tokens} tokens x {itemsize} bytes)"
        )

    report = {
        "prefix": prefix,
        "dtype": np.dtype(header.dtype).name,
        "documents": header.documents,
        "sequences": n,
        "tokens": tokens,
        "bin_bytes": bin_size,
        "mean_document_tokens": tokens / n if n else 0.0,
        "min_document_tokens": min_len or 0,
        "max_document_tokens": max_len,
        "problems": problems,
        "samples": [],
    }
    if problems or n == 0:
        return report

    data = np.memmap(prefix + ".bin", dtype=header.dtype, mode="r")
    if tokenizer is not None:
        vocab = tokenizer.vocab_size
        if full_scan:
            top = 0
            for start in range(0, data.shape[0], _CHUNK * 4):
                top = max(top, int(data[start : start + _CHUNK * 4].max()))
            if top >= vocab:
                problems.append(f"token id {top} >= vocabulary size {vocab}: wrong tokenizer?")
        ends = np.unique(np.linspace(0, n - 1, num=min(n, MAX_EOD_CHECKED)).astype(np.int64))
        last = (np.asarray(pointers[ends]) // itemsize) + np.asarray(lengths[ends]) - 1
        nonempty = np.asarray(lengths[ends]) > 0
        report["eod_terminated_share"] = (
            float((data[last[nonempty]] == tokenizer.eod).mean()) if nonempty.any() else 0.0
        )
        report["vocab_size"] = vocab
        report["eod"] = tokenizer.eod

    # megatron-core's reader must agree with ours on a few sequences.
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    megatron_ds = IndexedDataset(prefix)
    picks = sorted({0, n // 2, n - 1} | set(range(min(samples, n))))
    for i in picks:
        ours = data[int(pointers[i]) // itemsize : int(pointers[i]) // itemsize + int(lengths[i])]
        if not np.array_equal(megatron_ds[i], ours):
            problems.append(f"megatron-core's IndexedDataset reads sequence {i} differently")
            break
        if tokenizer is not None and not full_scan and ours.size and int(ours.max()) >= tokenizer.vocab_size:
            problems.append(
                f"sequence {i} holds token id {int(ours.max())} >= vocabulary size {tokenizer.vocab_size}"
            )
    for i in range(min(samples, n)):
        ids = megatron_ds[i]
        sample = {"index": i, "tokens": int(ids.shape[0]), "first_ids": [int(t) for t in ids[:16]]}
        if tokenizer is not None:
            try:
                sample["text"] = tokenizer.decode(ids[:4096])[:sample_chars]
            except Exception as err:  # ids out of the vocabulary: already reported as a problem
                sample["text"] = f"<cannot decode: {err}>"
        report["samples"].append(sample)
    return report


def format_report(report: dict) -> str:
    lines = [
        f"dataset {report['prefix']}",
        f"  dtype: {report['dtype']}   documents: {report['documents']:,}   sequences: {report['sequences']:,}   "
        f"tokens: {report['tokens']:,}   .bin: {report['bin_bytes'] / 1e6:,.1f} MB",
        f"  tokens per document: mean {report['mean_document_tokens']:,.1f}, min {report['min_document_tokens']:,}, "
        f"max {report['max_document_tokens']:,}",
    ]
    if "eod_terminated_share" in report:
        lines.append(
            f"  documents ending with EOD ({report['eod']}): {100 * report['eod_terminated_share']:.1f}%   "
            f"vocabulary: {report['vocab_size']:,}"
        )
    lines.append("  consistency: " + ("OK" if not report["problems"] else "PROBLEMS"))
    lines.extend(f"    - {p}" for p in report["problems"])
    for s in report["samples"]:
        lines.append(f"  sample {s['index']} ({s['tokens']:,} tokens): ids {s['first_ids']}")
        if "text" in s:
            lines.append("    " + repr(s["text"]))
    return "\n".join(lines)
