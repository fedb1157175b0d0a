"""dense_model.data.blend: format, weights, and errors that name the file and the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dense_model.data.blend import REDPAJAMA_1T_TOKENS, blend_weights, load_blend, write_blend
from dense_model.data.indexed import DocumentWriter


def _dataset(prefix: str, n_tokens: int) -> None:
    w = DocumentWriter(prefix, np.uint16)
    w.add_documents([[1] * n_tokens])
    w.finish()


def test_redpajama_1t_tokens_from_the_paper():
    # The paper's table: about 1.2T tokens in all, common crawl 878B of them, stackexchange the least.
    assert sum(REDPAJAMA_1T_TOKENS.values()) == 1210
    assert REDPAJAMA_1T_TOKENS["common_crawl"] == 878 and REDPAJAMA_1T_TOKENS["c4"] == 175
    assert sorted(REDPAJAMA_1T_TOKENS, key=REDPAJAMA_1T_TOKENS.get) == [
        "stackexchange",
        "wikipedia",
        "book",
        "arxiv",
        "github",
        "c4",
        "common_crawl",
    ]


def test_write_and_load_round_trip_with_relative_prefixes(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _dataset(str(data / "x_arxiv"), 30)
    _dataset(str(data / "x_book"), 10)
    entries = [
        {"subset": "arxiv", "prefix": str(data / "x_arxiv"), "documents": 1, "tokens": 30},
        {"subset": "book", "prefix": str(data / "x_book"), "documents": 1, "tokens": 10},
    ]
    blend = write_blend(str(data / "x_blend.json"), entries, "tokens")
    assert [d["prefix"] for d in blend["datasets"]] == ["x_arxiv", "x_book"]
    moved = tmp_path / "moved"
    data.rename(moved)  # the folder moves as a whole
    prefixes, weights = load_blend(str(moved / "x_blend.json"))
    assert prefixes == [str(moved / "x_arxiv"), str(moved / "x_book")]
    assert weights == pytest.approx([0.75, 0.25])
    assert blend_weights(entries, "redpajama") == pytest.approx([28 / 54, 26 / 54])


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--split-by-subset"):
        load_blend(str(tmp_path / "none.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_blend(str(bad))
    bad.write_text(json.dumps({"version": 1, "datasets": [{"prefix": "p"}]}))
    with pytest.raises(ValueError, match="malformed.*weight"):
        load_blend(str(bad))
    bad.write_text(json.dumps({"version": 1, "datasets": [{"prefix": "gone_text_document", "weight": 1.0}]}))
    with pytest.raises(FileNotFoundError, match=r"gone_text_document\.bin is missing"):
        load_blend(str(bad))
    with pytest.raises(ValueError, match="not RedPajama-1T subsets"):
        blend_weights([{"subset": "mine", "tokens": 3}], "redpajama")
