"""A Hugging Face tokenizer that runs SentencePiece itself: the exact export of a ``.model`` file.

Shipped (with ``tokenizer.model``) by the Hugging Face export when a SentencePiece model cannot be
written as a ``tokenizer.json`` that gives the same ids (see dense_model/export/tokenizer.py), and
loaded with ``AutoTokenizer.from_pretrained(folder, trust_remote_code=True)``. Encoding is
``SentencePieceProcessor.encode`` on the whole text (no splitting on special-token strings, no BOS),
decoding is ``SentencePieceProcessor.decode``; ``skip_special_tokens`` drops control and unknown
ids first, like dense_model's own tokenizer. Imports only transformers and sentencepiece, so the
folder works where dense_model is not installed.
"""

from __future__ import annotations

import os
import shutil

import sentencepiece
from transformers import PreTrainedTokenizer

VOCAB_FILE = "tokenizer.model"


class DenseModelSentencePieceTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, **kwargs) -> None:
        self.vocab_file = vocab_file
        self.sp_model = sentencepiece.SentencePieceProcessor(model_file=vocab_file)
        # split_special_tokens: the text goes to SentencePiece whole, as in training, even where it
        # spells "</s>"; SentencePiece never emits control ids for text.
        kwargs.setdefault("split_special_tokens", True)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def __len__(self) -> int:
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        return {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}

    def tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_token_to_id_with_added_voc(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode_pieces(tokens)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return token_ids_0 + (token_ids_1 or [])  # pretraining added no BOS

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        if skip_special_tokens:
            ids = [i for i in ids if not (self.sp_model.is_control(i) or self.sp_model.is_unknown(i))]
        return self.sp_model.decode(ids)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
