"""Read `dolma tokens` output (OLMo's flat token files) and convert it to our Megatron mmap format.

`dolma tokens` (what OLMo/OLMoE, and so the PolyCom seed, train on) writes `part-*.npy` files that,
despite the name, are raw arrays: no .npy header, just little-endian token ids (OLMo's
`MemMapDataset` reads them as `memmap_dtype`, uint16 by default, uint32 for big vocabularies), one
document after another, each ending with the EOS id (OLMoE's tokenizer: 0). A real .npy (with the
`\\x93NUMPY` header, as `np.save` writes) is read too, its dtype taken from the header.

`convert_token_files` writes the tokens unchanged (no re-tokenising) as one mmap dataset, one
document per EOS-terminated run (the EOS kept at its end; a file's tail after its last EOS is a
document of its own), streaming `chunk_tokens` tokens at a time: memory is flat in the file size
(plus 4 bytes per document for the index, as preprocessing). Every input is checked first (dtype,
size, every id < the vocabulary) so that bad input stops before anything is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from dense_model.data.indexed import DocumentWriter, token_dtype

NPY_MAGIC = b"\x93NUMPY"
RAW_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


@dataclass
class ConvertResult:
    prefix: str
    dtype: type[np.number]
    documents: int
    tokens: int


def open_token_file(path: str, dtype: str | None) -> np.ndarray:
    """The file's tokens as a read-only memmap [n]: a .npy's own dtype, else a raw file of `dtype`."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such token file")
    with open(path, "rb") as f:
        magic = f.read(len(NPY_MAGIC))
    if magic == NPY_MAGIC:
        arr = np.load(path, mmap_mode="r")
        if arr.ndim != 1 or arr.dtype.kind != "u":
            raise ValueError(
                f"{path}: a .npy of {arr.dtype} with shape {arr.shape}; token files are 1-D unsigned ints"
            )
        if dtype is not None and np.dtype(RAW_DTYPES[dtype]) != arr.dtype:
            raise ValueError(f"{path}: its .npy header says {arr.dtype}, not --dtype {dtype}; drop --dtype")
        return arr
    if dtype is None:
        raise ValueError(
            f"{path}: a raw token file (no .npy header) has no dtype of its own; give --dtype uint16 or "
            "uint32 (the memmap_dtype it was tokenised with; OLMo's default is uint16)"
        )
    itemsize = np.dtype(RAW_DTYPES[dtype]).itemsize
    size = os.path.getsize(path)
    if size % itemsize:
        raise ValueError(f"{path}: {size} bytes is not a whole number of {dtype} tokens; is --dtype right?")
    if size == 0:
        return np.zeros(0, dtype=RAW_DTYPES[dtype])
    return np.memmap(path, dtype=RAW_DTYPES[dtype], mode="r")


def check_token_file(path: str, tokens: np.ndarray, vocab_size: int, chunk_tokens: int) -> None:
    """Raise ValueError (naming the file and the fix) if the file cannot be this vocabulary's tokens."""
    limit = np.iinfo(tokens.dtype).max + 1
    if vocab_size > limit:
        raise ValueError(
            f"{path}: {tokens.dtype} holds token ids < {limit} but the tokenizer's vocabulary has "
            f"{vocab_size}; the file was written with a wider dtype (give --dtype uint32) or another tokenizer"
        )
    for start in range(0, tokens.shape[0], chunk_tokens):
        chunk = tokens[start : start + chunk_tokens]
        if int(chunk.max()) >= vocab_size:
            pos = start + int(np.argmax(chunk >= vocab_size))
            raise ValueError(
                f"{path}: token {pos} is id {int(tokens[pos])}, not below the "
                f"vocabulary size {vocab_size}; give the tokenizer the file was made with (or the right --dtype)"
            )


def convert_token_files(
    paths: list[str],
    output_prefix: str,
    *,
    vocab_size: int,
    eos_id: int,
    dtype: str | None = None,
    chunk_tokens: int = 1 << 24,
) -> ConvertResult:
    """Write `paths` (in order) as one mmap dataset OUTPUT_PREFIX.bin/.idx, documents split after EOS."""
    if not 0 <= eos_id < vocab_size:
        raise ValueError(f"--eos-id {eos_id} is not a token id of a {vocab_size}-token vocabulary")
    if not paths:
        raise ValueError("no token files given")
    arrays = [open_token_file(p, dtype) for p in paths]
    for p, arr in zip(paths, arrays, strict=True):
        check_token_file(p, arr, vocab_size, chunk_tokens)
    out_dtype = token_dtype(vocab_size)
    parent = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(parent, exist_ok=True)
    writer = DocumentWriter(output_prefix, out_dtype)
    try:
        for arr in arrays:
            _append_file(writer, arr, eos_id, chunk_tokens)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return ConvertResult(output_prefix, out_dtype, writer.documents, writer.tokens)


def _append_file(writer: DocumentWriter, tokens: np.ndarray, eos_id: int, chunk_tokens: int) -> None:
    """Stream one file into the writer; a document may span chunks (`pending` tokens carried)."""
    n = tokens.shape[0]
    pending = 0  # tokens of the current document already written, in earlier chunks
    for start in range(0, n, chunk_tokens):
        chunk = np.asarray(tokens[start : start + chunk_tokens])  # [c], read from the mmap
        ends = np.flatnonzero(chunk == eos_id) + 1  # end (exclusive) of each document closed here
        lengths = np.diff(ends, prepend=0)
        if lengths.shape[0]:
            lengths[0] += pending
            pending = chunk.shape[0] - int(ends[-1])
        else:
            pending += chunk.shape[0]
        writer.add_flat(chunk, lengths)
    if pending:  # the file's tail after its last EOS
        writer.add_flat(np.zeros(0, dtype=tokens.dtype), np.array([pending]))
