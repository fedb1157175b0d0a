"""The exported tokenizer is SentencePiece, id for id and text for text, on a generated corpus
(whitespace runs of every length 1-20 in every position, tabs, \\r\\n, digits, mixed scripts,
byte-fallback and unknown characters, the empty string), for SentencePiece models trained here with
the Llama-style settings and with SentencePiece's defaults (BPE and Unigram); models that no
tokenizer.json reproduces get the SentencePiece-running tokenizer, also exact; export_hf's
self-check refuses a tokenizer that splits whitespace runs (the bug of issue 13).
"""

import hashlib
import json
import random
from types import SimpleNamespace

import pytest

from dense_model.testing import LLAMA_STYLE_SENTENCEPIECE, train_sentencepiece

# name -> (trainer settings, what the export must ship)
FAMILIES = {
    "llama_bpe": (LLAMA_STYLE_SENTENCEPIECE, "tokenizer.json"),
    "default_bpe": (dict(model_type="bpe"), "tokenizer.json"),
    "default_unigram": (dict(model_type="unigram"), "tokenizer.json"),
    # Unigram ties between equal-score splits of a whitespace run: tokenizers breaks them otherwise
    "llama_unigram": (dict(LLAMA_STYLE_SENTENCEPIECE, model_type="unigram"), "sentencepiece"),
    # NFKC keeping whitespace: tokenizers normalises "\r\n" as one grapheme, SentencePiece per char
    "nfkc_keep_spaces": (
        dict(
            model_type="bpe",
            byte_fallback=True,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
        ),
        "sentencepiece",
    ),
}
WORDS = ["def", "x", "if", "value", "return", "42", "3.14", "日本語", "中文", "한국어", "Привет", "émigré"]
RARE = [
    "🙂",
    "👍🏽",
    "\x00",
    "\x07",
    "\x1b",
    "\x7f",
    "\u200b",
    "\u00a0",
    "\u3000",
    "\ufeff",
    "\U0001d518",
    "ﬁ",
    "①",
    "Ω",
]
SEPARATORS = [" ", "\t", "\n", "\r\n", "\r", "  "]


def generated_corpus(seed: int = 13) -> list[str]:
    """About 4,000 strings: structured whitespace runs, then random mixes."""
    texts = [""]
    for n in range(1, 21):
        run = " " * n
        for word in ("a", "if x:", "x = 1", "日本", "\t", "🙂"):
            texts += [run, run + word, word + run, word + run + word, run + word + run]
            texts += [word + "\n" + run + word, word + "\r\n" + run + word + run, "\t" + run + word]
    rng = random.Random(seed)
    for _ in range(3000):
        text = " " * rng.choice([0, 0, 1, 2, 4])
        for _ in range(rng.randrange(1, 9)):
            text += rng.choice(WORDS + RARE)
            text += rng.choice(SEPARATORS) * rng.randrange(0, 3) + " " * rng.randrange(0, 7)
        texts.append(text)
    return texts


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory):
    """SentencePiece models of each family (dense_model.testing.train_sentencepiece)."""
    out = tmp_path_factory.mktemp("spm_families")
    return {name: train_sentencepiece(out, name, **settings) for name, (settings, _) in FAMILIES.items()}


@pytest.fixture(scope="module")
def corpus():
    return generated_corpus()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exported_tokenizer_is_sentencepiece(trained_models, corpus, family, tmp_path, monkeypatch):
    import sentencepiece
    from transformers import AutoTokenizer

    from dense_model.export.tokenizer import export_tokenizer

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    model = trained_models[family]
    exported = export_tokenizer("sentencepiece", model, tmp_path / "tok")
    assert exported.provenance["exported_as"] == FAMILIES[family][1]
    assert exported.provenance["sha256"] == hashlib.sha256(open(model, "rb").read()).hexdigest()
    assert exported.provenance["source"] == model
    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    hf = AutoTokenizer.from_pretrained(tmp_path / "tok", trust_remote_code=True)
    assert (hf.bos_token_id, hf.eos_token_id) == (sp.eos_id(), sp.eos_id())
    assert len(corpus) > 3000
    whole_runs = 0
    for text in corpus:
        expected = sp.encode(text)
        assert hf(text, verbose=False)["input_ids"] == expected, repr(text)
        assert hf.decode(expected) == sp.decode(expected), repr(text)
        whole_runs += any(set(sp.id_to_piece(i)) == {"▁"} and len(sp.id_to_piece(i)) > 1 for i in expected)
    if FAMILIES[family][0].get("allow_whitespace_only_pieces"):
        assert whole_runs > 500  # the corpus exercises multi-space pieces, the case of issue 13


def test_export_refuses_a_tokenizer_that_splits_whitespace(trained_models, tmp_path, monkeypatch):
    """The pre-fix tokenizer.json (Metaspace splitting before every ▁) fails export_hf's self-check,
    and the folder it was written to is removed."""
    from tokenizers import Tokenizer, pre_tokenizers

    import dense_model.export.hf as hf_module
    from dense_model.export.hf import ExportError, _export_checked_tokenizer

    real = hf_module.export_tokenizer

    def splitting(tokenizer_type, model_path, out_dir, model_max_length=None):
        exported = real(tokenizer_type, model_path, out_dir, model_max_length)
        path = str(out_dir / "tokenizer.json")
        tok = Tokenizer.from_file(path)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
        tok.save(path)
        return exported

    monkeypatch.setattr(hf_module, "export_tokenizer", splitting)  # the name export_hf calls
    cfg = SimpleNamespace(
        data=SimpleNamespace(tokenizer_type="sentencepiece", tokenizer_model=trained_models["llama_bpe"]),
        model=SimpleNamespace(seq_length=64),
    )
    folder = tmp_path / "out.tmp-export"
    folder.mkdir()
    with pytest.raises(ExportError, match="does not reproduce .*llama_bpe.model.* instead of"):
        _export_checked_tokenizer(cfg, folder)
    assert not folder.exists()
    # unpatched: the same model passes and the provenance names it
    monkeypatch.setattr(hf_module, "export_tokenizer", real)
    folder.mkdir()
    provenance, special = _export_checked_tokenizer(cfg, folder)
    assert provenance["exported_as"] == "tokenizer.json" and special["eos_token_id"] == 2
    assert json.loads((folder / "tokenizer_config.json").read_text())["eos_token"] == "</s>"
