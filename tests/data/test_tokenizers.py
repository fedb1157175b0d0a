"""dense_model.data.tokenizers with real SentencePiece and Hugging Face tokenizers trained here."""

from __future__ import annotations

import json
import pickle

import pytest

from dense_model.data.tokenizers import build_tokenizer

TEXTS = ["Hello world.", "def f(x):\n    return x + 1", "Café 日本語 🎉", ""]


def test_sentencepiece_interface(spm_model, sp):
    tok = build_tokenizer("sentencepiece", spm_model)
    assert tok.vocab_size == 512
    assert tok.eod == 2 == tok.eos
    assert tok.bos == 1
    assert tok.pad == tok.eod  # the model has no pad piece
    for text in TEXTS:
        assert tok.encode(text) == sp.encode(text)
        assert tok.tokenize(text) == sp.encode(text)
    assert tok.encode_batch(TEXTS) == [sp.encode(t) for t in TEXTS]
    assert tok.decode(tok.encode("Hello world.")) == "Hello world."
    ids = tok.unique_identifiers
    json.dumps(ids)  # megatron-core puts it in the dataset cache description
    assert ids["tokenizer_path"] == tok.path


def test_megatron_tokenizer_type_aliases(spm_model):
    assert build_tokenizer("SentencePieceTokenizer", spm_model).vocab_size == 512
    assert build_tokenizer("GPTSentencePieceTokenizer", spm_model).eod == 2


def test_pickles_by_path(spm_model):
    tok = build_tokenizer("sentencepiece", spm_model, num_threads=2)
    back = pickle.loads(pickle.dumps(tok))
    assert back.encode("pickled text") == tok.encode("pickled text")
    assert back.num_threads == 2
    assert len(pickle.dumps(tok)) < 1000


def test_errors_name_the_argument_and_the_fix(tmp_path, spm_model):
    with pytest.raises(ValueError, match="--tokenizer-type 'gpt2'.*sentencepiece, huggingface"):
        build_tokenizer("gpt2", spm_model)
    with pytest.raises(FileNotFoundError, match="--tokenizer-model .*missing.model"):
        build_tokenizer("sentencepiece", str(tmp_path / "missing.model"))
    with pytest.raises(ValueError, match="is a folder"):
        build_tokenizer("sentencepiece", str(tmp_path))


def test_sentencepiece_model_without_eos_is_refused(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"line number {i} of a tiny corpus" for i in range(200)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "noeos"), vocab_size=40, eos_id=-1, minloglevel=2
    )
    with pytest.raises(ValueError, match="no EOS piece"):
        build_tokenizer("sentencepiece", str(tmp_path / "noeos.model"))


def _train_hf(tmp_path, special):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    import pydoc_data.topics

    tok.train_from_iterator(list(pydoc_data.topics.topics.values())[:20], trainer)
    return tok


def test_huggingface_folder_and_tokenizer_json(tmp_path):
    from transformers import PreTrainedTokenizerFast

    backend = _train_hf(tmp_path, ["<|endoftext|>", "<pad>"])
    folder = tmp_path / "hf"
    PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<pad>"
    ).save_pretrained(str(folder))
    tok = build_tokenizer("huggingface", str(folder))
    assert tok.eod == backend.token_to_id("<|endoftext|>")
    assert tok.pad == backend.token_to_id("<pad>")
    assert tok.vocab_size == backend.get_vocab_size()
    for text in TEXTS:
        assert tok.encode(text) == backend.encode(text, add_special_tokens=False).ids
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.decode(tok.encode("Hello world.")) == "Hello world."
    assert pickle.loads(pickle.dumps(tok)).encode("x y") == tok.encode("x y")

    # a bare tokenizer.json: EOS found among the usual names, PAD falls back to EOD
    bare = tmp_path / "bare.json"
    backend.save(str(bare))
    tok2 = build_tokenizer("huggingface", str(bare))
    assert tok2.eod == tok.eod and tok2.pad == tok2.eod


def test_huggingface_without_eos_is_refused(tmp_path):
    backend = _train_hf(tmp_path, ["<unk>"])
    path = tmp_path / "noeos.json"
    backend.save(str(path))
    with pytest.raises(ValueError, match="no EOS token"):
        build_tokenizer("huggingface", str(path))
