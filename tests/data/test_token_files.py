"""dense_model.data.token_files / convert_token_files.py: `dolma tokens` output (raw uint16/uint32
token arrays, documents ended by EOS) becomes an mmap dataset whose tokens are the file's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dense_model.data.token_files import convert_token_files
from dense_model.testing import run_tool

TOOL = (
    Path(__file__).resolve().parents[2]
    / "toolkits"
    / "pretrain_data_preprocessing"
    / "convert_token_files.py"
)
EOS = 0


def _documents(rng, count: int, vocab: int) -> list[np.ndarray]:
    """Documents of 1..40 ids in [1, vocab), each ended by EOS."""
    return [np.append(rng.integers(1, vocab, rng.integers(1, 40)), EOS) for _ in range(count)]


def _write_raw(path: Path, docs: list[np.ndarray], dtype, tail=()) -> np.ndarray:
    """A dolma-style file: the tokens' bytes, no header. Returns the tokens."""
    flat = np.concatenate([*docs, np.asarray(tail, dtype=np.int64)]).astype(dtype)
    path.write_bytes(flat.tobytes())
    return flat


@pytest.mark.parametrize("dtype,vocab", [(np.uint16, 50280), (np.uint32, 100_278)])
def test_converted_documents_are_the_files_split_at_eos(tmp_path, dtype, vocab, data_helpers):
    rng = np.random.default_rng(0)
    docs_a, docs_b = _documents(rng, 60, vocab), _documents(rng, 30, vocab)
    _write_raw(tmp_path / "a.npy", docs_a, dtype)
    # The second file ends without EOS: its tail is a document of its own.
    _write_raw(tmp_path / "b.npy", docs_b, dtype, tail=[7, 8, 9])
    # chunk_tokens far below the file size: documents cross chunk boundaries (the streaming path).
    result = convert_token_files(
        [str(tmp_path / "a.npy"), str(tmp_path / "b.npy")],
        str(tmp_path / "out" / "olmoe"),
        vocab_size=vocab,
        eos_id=EOS,
        dtype=np.dtype(dtype).name,
        chunk_tokens=17,
    )
    expected = [d.tolist() for d in docs_a + docs_b] + [[7, 8, 9]]
    assert data_helpers.read_dataset(result.prefix) == expected
    assert result.documents == len(expected) and result.tokens == sum(map(len, expected))


def test_a_real_npy_brings_its_dtype(tmp_path, data_helpers):
    docs = _documents(np.random.default_rng(1), 20, 50280)
    np.save(tmp_path / "part.npy", np.concatenate(docs).astype(np.uint32))
    proc = run_tool(
        TOOL,
        [
            "--input",
            tmp_path / "part.npy",
            "--eos-id",
            EOS,
            "--vocab-size",
            50280,
            "--output-prefix",
            tmp_path / "o",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert data_helpers.read_dataset(str(tmp_path / "o")) == [d.tolist() for d in docs]


@pytest.mark.parametrize(
    "dtype,vocab,extra,expected",
    [
        (np.uint16, 50280, [50280], "token 5 is id 50280, not below the vocabulary size 50280"),
        (np.uint16, 100_278, [], "uint16 holds token ids < 65536 but the tokenizer's vocabulary has 100278"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, dtype, vocab, extra, expected):
    _write_raw(tmp_path / "p.npy", [np.array([3, 4, 5, 6, 0])], dtype, tail=extra)
    args = ["--input", tmp_path / "p.npy", "--dtype", np.dtype(dtype).name, "--eos-id", EOS]
    proc = run_tool(TOOL, [*args, "--vocab-size", vocab, "--output-prefix", tmp_path / "out" / "o"], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "p.npy") in lines[0] and expected in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_gpt_dataset_samples_are_the_files_tokens(tmp_path, spm_model):
    """What training reads: every sample megatron-core's GPTDataset cuts from the converted data is
    whole file documents, bounded by a suffix and a prefix of file documents."""
    from dense_model.data.gpt_dataset import build_gpt_datasets
    from dense_model.data.tokenizers import build_tokenizer

    tok = build_tokenizer("sentencepiece", spm_model)
    docs = _documents(np.random.default_rng(2), 200, tok.vocab_size)
    _write_raw(tmp_path / "part.npy", docs, np.uint16)
    prefix = str(tmp_path / "olmoe")
    convert_token_files(
        [str(tmp_path / "part.npy")], prefix, vocab_size=tok.vocab_size, eos_id=EOS, dtype="uint16"
    )
    train, _, _ = build_gpt_datasets(
        [prefix],
        None,
        tokenizer=tok,
        seq_length=32,
        seed=1,
        split="100,0,0",
        num_samples=(64, 0, 0),
        cache_dir=str(tmp_path / "cache"),
    )
    known = {tuple(d.tolist()) for d in docs}
    for i in range(64):
        s = train[i]
        window = [*s["tokens"].tolist(), int(s["labels"][-1])]  # the seq_length + 1 tokens read
        cuts = [j + 1 for j, t in enumerate(window) if t == EOS]
        pieces = [window[a:b] for a, b in zip([0, *cuts], [*cuts, len(window)], strict=True) if b > a]
        if len(pieces) == 1:  # inside one document
            assert any(tuple(window) == d[k : k + len(window)] for d in known for k in range(len(d)))
            continue
        for piece in pieces[1:-1]:
            assert tuple(piece) in known
        assert any(d[len(d) - len(pieces[0]) :] == tuple(pieces[0]) for d in known)
        assert any(d[: len(pieces[-1])] == tuple(pieces[-1]) for d in known)
