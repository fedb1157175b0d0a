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

    # a bare tokenizer.json: EOS and PAD found among the usual names
    bare = tmp_path / "bare.json"
    backend.save(str(bare))
    tok2 = build_tokenizer("huggingface", str(bare))
    assert tok2.eod == tok.eod and tok2.pad == tok.pad


def test_huggingface_without_eos_is_refused(tmp_path):
    backend = _train_hf(tmp_path, ["<unk>"])
    path = tmp_path / "noeos.json"
    backend.save(str(path))
    with pytest.raises(ValueError, match="no EOS token"):
        build_tokenizer("huggingface", str(path))


def _olmo_like_tokenizer_json(tmp_path, eos=True):
    """A tokenizer.json laid out like dolma's GPT-NeoX one (allenai/gpt-neox-olmo-dolma-v1_5:
    |||IP_ADDRESS||| 0, <|padding|> 1, ..., <|endoftext|> the last id), no tokenizer_config.json."""
    special = ["|||IP_ADDRESS|||", "<|padding|>"]
    backend = _train_hf(tmp_path, special)
    if eos:
        backend.add_special_tokens(["<|endoftext|>"])
    path = tmp_path / ("tokenizer.json" if eos else "noeos_tokenizer.json")
    backend.save(str(path))
    return path, backend


def test_a_bare_dolma_style_tokenizer_json_gives_its_eos_and_pad(tmp_path):
    """The seed's tokenizer file alone: EOS <|endoftext|> (dolma's 50279, the last id), PAD
    <|padding|> (1), the vocabulary every id (dolma's 50280)."""
    path, backend = _olmo_like_tokenizer_json(tmp_path)
    tok = build_tokenizer("huggingface", str(path))
    assert tok.eod == backend.token_to_id("<|endoftext|>") == backend.get_vocab_size() - 1
    assert tok.pad == 1
    assert tok.vocab_size == backend.get_vocab_size()


def test_a_tokenizer_json_without_eos_stops_the_launch_in_one_line(tmp_path, capsys):
    """configs/moe/olmoe_1b7b.yaml with a tokenizer.json that has no EOS token: the pre-launch check
    (launcher.main, what run_pretrain.sh runs) exits 2 with one line naming the file and the fix."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from dense_model.launcher import main

    path, _ = _olmo_like_tokenizer_json(tmp_path, eos=False)
    prefix = str(tmp_path / "tiny_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(600):
        builder.add_document(np.arange(1, 50, dtype=np.uint16), [49])
    builder.finalize(prefix + ".idx")
    args = [
        "configs/moe/olmoe_1b7b.yaml", "data.blend=null", f"data.paths=[{prefix}]",
        f"data.tokenizer_model={path}", "model.vocab_size=null",
    ]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(
        f"config error: data.tokenizer_model: cannot load {path} as a huggingface tokenizer"
    ), err
    assert "has no EOS token" in err and "<|endoftext|>" in err, err
