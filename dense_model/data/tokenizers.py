"""Tokenizers for preprocessing and training: one small interface over SentencePiece and Hugging Face.

    from dense_model.data.tokenizers import build_tokenizer
    tok = build_tokenizer("sentencepiece", "tokenizer.model")
    ids = tok.encode("Hello world")          # no BOS/EOS added
    tok.eod, tok.pad, tok.vocab_size

The objects also satisfy what megatron-core's `GPTDatasetConfig.tokenizer` reads: `vocab_size`
(token dtype), `eod` (loss mask / position resets), `pad` (padding mask) and `unique_identifiers`
(part of the dataset cache key, JSON-serialisable). They pickle by path, so worker processes can
receive them cheaply.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence

TOKENIZER_TYPES = ("sentencepiece", "huggingface")

# Megatron-LM's --tokenizer-type names, accepted so its commands can be pasted unchanged.
_ALIASES = {
    "sentencepiece": "sentencepiece",
    "sentencepiecetokenizer": "sentencepiece",
    "gptsentencepiecetokenizer": "sentencepiece",
    "llama2tokenizer": "sentencepiece",
    "huggingface": "huggingface",
    "huggingfacetokenizer": "huggingface",
    "hf": "huggingface",
}

# Tried in order when a bare tokenizer.json carries no tokenizer_config.json naming its EOS token.
_COMMON_EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")
# The same for its pad token (GPT-NeoX's and dolma's <|padding|> first); none found: PAD = EOD.
_COMMON_PAD_TOKENS = ("<|padding|>", "<pad>", "<|pad|>", "[PAD]")


class Tokenizer:
    """Common interface; see `build_tokenizer`."""

    tokenizer_type: str
    path: str
    vocab_size: int
    eod: int
    bos: int | None
    pad: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; ``skip_special_tokens`` drops control and unknown tokens first (BOS, EOS,
        PAD, UNK), as Hugging Face tokenizers and lm-eval's ``hf`` model do for generated text."""
        raise NotImplementedError

    # megatron-core / Megatron-LM spellings
    @property
    def eos(self) -> int:
        return self.eod

    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids) -> str:
        return self.decode(ids)

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What identifies this tokenizer in megatron-core's dataset cache key (JSON-serialisable)."""
        ids = OrderedDict()
        ids["class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        ids["tokenizer_path"] = self.path
        ids["vocab_size"] = self.vocab_size
        ids["eod"] = self.eod
        return ids

    def fingerprint(self) -> str:
        """sha256 of the model file(s): equal fingerprints encode identically (used by resume)."""
        raise NotImplementedError

    def __reduce__(self):
        return (build_tokenizer, (self.tokenizer_type, self.path), {"num_threads": self.num_threads})

    def __setstate__(self, state):
        self.num_threads = state["num_threads"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def _sha256_files(paths: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file. EOD is the model's EOS id; PAD is its pad id, else EOD."""

    tokenizer_type = "sentencepiece"

    def __init__(self, model_file: str, num_threads: int = 1) -> None:
        import sentencepiece

        self.path = os.path.abspath(model_file)
        # One thread by default: preprocessing runs one process per core, and more threads inside
        # each would oversubscribe the cores.
        self.num_threads = num_threads
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as err:  # sentencepiece says "INTERNAL: could not parse ModelProto"
            raise ValueError(
                f"--tokenizer-model {model_file}: not a SentencePiece model ({str(err).strip()[:120]}); give "
                "the .model file SentencePiece wrote (toolkits/pretrain_data_preprocessing/train_tokenizer.py "
                "trains one), or a Hugging Face tokenizer folder / tokenizer.json with --tokenizer-type huggingface"
            ) from None
        self.vocab_size = int(self._sp.vocab_size())
        eos = int(self._sp.eos_id())
        if eos < 0:
            raise ValueError(
                f"--tokenizer-model {model_file}: this SentencePiece model has no EOS piece (eos_id=-1), "
                "so documents cannot be ended with EOD. Train it with an eos id, e.g. "
                "`toolkits/pretrain_data_preprocessing/train_tokenizer.py` (eos_id=2), or pass "
                "eos_id=2 to SentencePieceTrainer."
            )
        self.eod = eos
        bos = int(self._sp.bos_id())
        self.bos = bos if bos >= 0 else None
        pad = int(self._sp.pad_id())
        self.pad = pad if pad >= 0 else eos

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=self.num_threads)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if not (self._sp.IsControl(i) or self._sp.IsUnknown(i))]
        return self._sp.decode(ids)

    def fingerprint(self) -> str:
        return _sha256_files([self.path])


class HuggingFaceTokenizer(Tokenizer):
    """A local Hugging Face tokenizer: a folder (`AutoTokenizer`, offline) or a `tokenizer.json` file.

    Encoding goes through the fast `tokenizers` backend with `add_special_tokens=False`.
    """

    tokenizer_type = "huggingface"

    def __init__(self, path: str, num_threads: int = 1) -> None:
        self.path = os.path.abspath(path)
        self.num_threads = num_threads
        eos_id = bos_id = pad_id = None
        if os.path.isdir(path):
            backend, eos_id, bos_id, pad_id, vocab_size = self._load_folder(path)
        else:
            backend, eos_id, bos_id, pad_id, vocab_size = self._load_json(path)
        if eos_id is None:
            raise ValueError(
                f"--tokenizer-model {path}: the Hugging Face tokenizer has no EOS token, so documents "
                "cannot be ended with EOD. Set `eos_token` in its tokenizer_config.json (or "
                "special_tokens_map.json), or add one of "
                + ", ".join(_COMMON_EOS_TOKENS)
                + " to the vocabulary."
            )
        self._tok = backend
        self.vocab_size = int(vocab_size)
        self.eod = int(eos_id)
        self.bos = None if bos_id is None else int(bos_id)
        self.pad = int(pad_id) if pad_id is not None else self.eod
        self._batch = getattr(self._tok, "encode_batch_fast", None) or self._tok.encode_batch

    @staticmethod
    def _load_folder(path: str):
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as err:
            if os.path.isfile(os.path.join(path, "tokenizer.json")):
                return HuggingFaceTokenizer._load_json(os.path.join(path, "tokenizer.json"))
            raise ValueError(
                f"--tokenizer-model {path}: transformers.AutoTokenizer could not load this folder offline "
                f"({type(err).__name__}: {err}). Point it at a folder saved with save_pretrained() "
                "or at a tokenizer.json file."
            ) from err
        backend = getattr(hf, "backend_tokenizer", None) or getattr(hf, "_tokenizer", None)
        if backend is None:
            raise ValueError(
                f"--tokenizer-model {path}: only fast (Rust `tokenizers`) Hugging Face tokenizers are "
                "supported; this folder loads a slow tokenizer. Save it with a tokenizer.json."
            )
        return backend, hf.eos_token_id, hf.bos_token_id, hf.pad_token_id, len(hf)

    @staticmethod
    def _load_json(path: str):
        import tokenizers

        backend = tokenizers.Tokenizer.from_file(path)
        special: dict = {}
        folder = os.path.dirname(os.path.abspath(path))
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            cfg_path = os.path.join(folder, name)
            if os.path.isfile(cfg_path):
                with open(cfg_path, encoding="utf-8") as f:
                    cfg = json.load(f)
                for key in ("eos_token", "bos_token", "pad_token"):
                    value = cfg.get(key)
                    if isinstance(value, dict):
                        value = value.get("content")
                    if isinstance(value, str) and key not in special:
                        special[key] = value

        def token_id(token: str | None) -> int | None:
            return None if token is None else backend.token_to_id(token)

        eos_id = token_id(special.get("eos_token"))
        if eos_id is None:
            eos_id = next((token_id(t) for t in _COMMON_EOS_TOKENS if token_id(t) is not None), None)
        pad_id = token_id(special.get("pad_token"))
        if pad_id is None:
            pad_id = next((token_id(t) for t in _COMMON_PAD_TOKENS if token_id(t) is not None), None)
        vocab_size = backend.get_vocab_size(with_added_tokens=True)
        return backend, eos_id, token_id(special.get("bos_token")), pad_id, vocab_size

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def fingerprint(self) -> str:
        if os.path.isdir(self.path):
            names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
            files = [os.path.join(self.path, n) for n in names if os.path.isfile(os.path.join(self.path, n))]
        else:
            files = [self.path]
        return _sha256_files(files)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str, *, num_threads: int = 1) -> Tokenizer:
    """Load a tokenizer by type ("sentencepiece" or "huggingface") from a local file or folder.

    Raises ValueError for an unknown type or a model without EOS, FileNotFoundError for a missing path.
    `num_threads` applies to `encode_batch` (SentencePiece's thread pool); the default 1 suits one
    process per core.
    """
    kind = _ALIASES.get(str(tokenizer_type).replace("-", "").replace("_", "").lower())
    if kind is None:
        raise ValueError(
            f"--tokenizer-type {tokenizer_type!r} is not supported; use one of {', '.join(TOKENIZER_TYPES)} "
            "(a SentencePiece .model file, or a local Hugging Face folder / tokenizer.json)."
        )
    if not tokenizer_model:
        raise ValueError("--tokenizer-model is required: the path of the tokenizer model file or folder.")
    if not os.path.exists(tokenizer_model):
        raise FileNotFoundError(
            f"--tokenizer-model {tokenizer_model}: no such file or folder. Give the path of a "
            + (
                "SentencePiece .model file (train one with train_tokenizer.py)."
                if kind == "sentencepiece"
                else "local Hugging Face tokenizer folder or tokenizer.json (hub names are not downloaded)."
            )
        )
    if kind == "sentencepiece":
        if os.path.isdir(tokenizer_model):
            raise ValueError(
                f"--tokenizer-model {tokenizer_model} is a folder; --tokenizer-type sentencepiece needs the "
                ".model file itself (or use --tokenizer-type huggingface for a Hugging Face folder)."
            )
        return SentencePieceTokenizer(tokenizer_model, num_threads=num_threads)
    return HuggingFaceTokenizer(tokenizer_model, num_threads=num_threads)
