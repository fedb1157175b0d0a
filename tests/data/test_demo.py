"""dense_model.data.demo: the laptop demo's tokenizer and blend, made once and cached."""

from __future__ import annotations

import os

from dense_model.data.blend import load_blend
from dense_model.data.demo import prepare_demo_dataset
from dense_model.data.tokenizers import build_tokenizer


def test_prepare_demo_dataset_builds_then_hits_the_cache(tmp_path):
    first = prepare_demo_dataset(str(tmp_path / "demo"))
    tok = build_tokenizer("sentencepiece", first["tokenizer_model"])
    assert tok.vocab_size == 4096 and tok.eod == 2
    prefixes, weights = load_blend(first["blend"])
    assert sorted(os.path.basename(p) for p in prefixes) == [
        f"redpajama_sample_{s}_text_document"
        for s in ("arxiv", "book", "github", "stackexchange", "wikipedia")
    ]
    assert abs(sum(weights) - 1) < 1e-9
    stamps = {
        p: os.stat(p).st_mtime_ns for p in (first["tokenizer_model"], first["blend"], prefixes[0] + ".bin")
    }
    second = prepare_demo_dataset(str(tmp_path / "demo"))
    assert second == first
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps, "a second call must not redo anything"
