"""dense_model.data.inspect: counts, samples, and the .bin/.idx consistency check."""

from __future__ import annotations

import numpy as np

from dense_model.data.indexed import DocumentWriter
from dense_model.data.inspect import format_report, inspect_dataset
from dense_model.data.tokenizers import build_tokenizer


def _make(prefix: str, tok, texts: list[str]) -> None:
    w = DocumentWriter(prefix, np.uint16)
    w.add_documents([tok.encode(t) + [tok.eod] for t in texts])
    w.finish()


def test_report_of_a_good_dataset(tmp_path, spm_model, texts):
    tok = build_tokenizer("sentencepiece", spm_model)
    prefix = str(tmp_path / "d")
    _make(prefix, tok, texts[:20])
    report = inspect_dataset(prefix + ".bin", tok, samples=2, full_scan=True)
    assert report["problems"] == []
    assert report["documents"] == 20 and report["dtype"] == "uint16"
    assert report["tokens"] == sum(len(tok.encode(t)) + 1 for t in texts[:20])
    assert report["eod_terminated_share"] == 1.0
    assert report["samples"][1]["text"].startswith(texts[1][:50])
    text = format_report(report)
    assert "consistency: OK" in text and "documents: 20" in text


def test_inconsistent_pairs_are_reported(tmp_path, spm_model, texts):
    tok = build_tokenizer("sentencepiece", spm_model)
    prefix = str(tmp_path / "d")
    _make(prefix, tok, texts[:5])
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(10)
    report = inspect_dataset(prefix, tok)
    assert any(".bin is 10 bytes" in p for p in report["problems"])
    assert "PROBLEMS" in format_report(report)

    _make(prefix, tok, texts[:5])
    with open(prefix + ".idx", "r+b") as f:  # corrupt the second byte pointer
        f.seek(34 + 5 * 4 + 8)
        f.write(np.int64(3).tobytes())
    assert any("byte pointer of sequence 1" in p for p in inspect_dataset(prefix)["problems"])


def test_token_ids_beyond_the_vocabulary(tmp_path, spm_model):
    tok = build_tokenizer("sentencepiece", spm_model)
    prefix = str(tmp_path / "d")
    w = DocumentWriter(prefix, np.uint16)
    w.add_documents([[5, 6, 60000]])
    w.finish()
    report = inspect_dataset(prefix, tok, full_scan=True)
    assert any("60000" in p for p in report["problems"])
