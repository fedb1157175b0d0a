"""dense_model.data.train_tokenizer: a real SentencePiece model from JSON lines with bad lines."""

from __future__ import annotations

import pytest

from dense_model.data.tokenizers import build_tokenizer
from dense_model.data.train_tokenizer import sample_documents, train_sentencepiece


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_trains_a_usable_model(tmp_path, texts, data_helpers, model_type):
    data_helpers.write_jsonl(
        str(tmp_path / "in" / "a.jsonl"), [{"text": t} for t in texts[:120]] + ["broken", '{"x": 1}']
    )
    data_helpers.write_jsonl(str(tmp_path / "in" / "b.jsonl.zst"), [{"text": t} for t in texts[120:]], "zst")
    result = train_sentencepiece(
        [str(tmp_path / "in")],
        str(tmp_path / "tok"),
        vocab_size=400,
        model_type=model_type,
        max_documents=150,
        num_threads=1,
    )
    assert result.documents_seen == len(texts) and result.documents_used == 150
    assert result.bad.counts["invalid_json"] == 1 and result.bad.counts["missing_key"] == 1
    tok = build_tokenizer("sentencepiece", result.model_file)
    assert tok.vocab_size == 400 and tok.eod == 2 and tok.bos == 1
    text = "def f(x):\n    return 'ünïcode ✓' * 1234"
    assert tok.decode(tok.encode(text)) == text  # byte fallback, whitespace and newlines kept


def test_reservoir_sample_is_bounded_and_seeded(tmp_path, data_helpers):
    path = data_helpers.write_jsonl(
        str(tmp_path / "a.jsonl"), [{"text": f"document {i}"} for i in range(500)]
    )
    a, seen, _ = sample_documents([path], 20, seed=1)
    b, _, _ = sample_documents([path], 20, seed=1)
    c, _, _ = sample_documents([path], 20, seed=2)
    assert seen == 500 and len(a) == 20 and a == b and a != c
    assert any(int(t.split()[1]) >= 250 for t in a), "the sample reaches past the start of the input"


def test_vocab_too_large_for_the_text_is_explained(tmp_path, data_helpers):
    path = data_helpers.write_jsonl(str(tmp_path / "a.jsonl"), [{"text": "tiny corpus"}])
    with pytest.raises(ValueError, match="--vocab-size"):
        train_sentencepiece([path], str(tmp_path / "t"), vocab_size=5000, num_threads=1)
