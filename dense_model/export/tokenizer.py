"""The checkpoint's tokenizer as a Hugging Face tokenizer folder (``AutoTokenizer``, offline).

SentencePiece ``.model`` files become a ``tokenizer.json`` (the Rust ``tokenizers`` backend) built
from the model's own spec, so ids match ``sentencepiece`` exactly, not just for Llama-style models:

  * normalizer: the model's precompiled charmap (e.g. ``nmt_nfkc``, which also maps ``\\n`` and
    ``\\t`` to spaces), then, when the spec says so, strip + collapse runs of spaces
    (``remove_extra_whitespaces``) and the dummy ``▁`` prefix (``add_dummy_prefix``);
  * pre-tokenizer: split before each ``▁`` (``split_by_whitespace``);
  * model: BPE (merges recovered from the vocabulary) or Unigram (scores), with byte fallback.

transformers' ``LlamaTokenizer`` does none of the normalisation (Llama's own model has identity
normalisation); for a model trained with SentencePiece's defaults it gives other ids for newlines,
tabs, double spaces and NFKC characters, which lm-eval's few-shot prompts are full of.

Special tokens. Our pretraining data has no BOS: each document ends with EOD (the SentencePiece
EOS), so EOD is also what a document follows. The exported tokenizer therefore adds nothing to
encoded text and names EOD as both ``eos_token`` and ``bos_token`` (the GPT-2 convention), so a
tool that prefixes BOS (lm-eval's ``hf`` model for an empty context or a rolling window) conditions
on EOD, exactly as dense_model's own lm-eval adapter does.

Hugging Face tokenizers (a folder or a ``tokenizer.json``) are re-saved with ``save_pretrained``.
"""

from __future__ import annotations

import os
from pathlib import Path


def export_tokenizer(
    tokenizer_type: str,
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    model_max_length: int | None = None,
) -> dict:
    """Write a Hugging Face tokenizer for ``model_path`` into ``out_dir``.

    Returns the special token ids {"bos_token_id", "eos_token_id", "pad_token_id"} for config.json.
    """
    from dense_model.data.tokenizers import build_tokenizer

    ours = build_tokenizer(tokenizer_type, str(model_path))
    if ours.tokenizer_type == "sentencepiece":
        hf = sentencepiece_to_hf(str(model_path))
    else:
        hf = _load_hf(str(model_path), ours)
    if model_max_length is not None:
        hf.model_max_length = int(model_max_length)
    hf.save_pretrained(str(out_dir))
    return {
        "bos_token_id": hf.bos_token_id,
        "eos_token_id": hf.eos_token_id,
        "pad_token_id": hf.pad_token_id,
    }


def sentencepiece_to_hf(model_file: str):
    """A ``PreTrainedTokenizerFast`` that encodes and decodes like the SentencePiece ``model_file``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    trainer, spec = proto.trainer_spec, proto.normalizer_spec
    byte_fallback = bool(trainer.byte_fallback)
    unk_piece = proto.pieces[trainer.unk_id].piece if 0 <= trainer.unk_id < len(proto.pieces) else None

    if trainer.model_type == 2:  # BPE
        extracted = SentencePieceExtractor(model_file).extract(BPE)
        model = BPE(
            vocab=extracted["vocab"],
            merges=extracted["merges"],
            unk_token=unk_piece,
            fuse_unk=True,
            byte_fallback=byte_fallback,
            dropout=None,
        )
    elif trainer.model_type == 1:  # Unigram
        model = Unigram(
            [(p.piece, p.score) for p in proto.pieces], unk_id=trainer.unk_id, byte_fallback=byte_fallback
        )
    else:
        raise ValueError(
            f"{model_file}: SentencePiece model type {trainer.model_type} (word/char) cannot be exported; "
            "only BPE and Unigram models are supported"
        )
    tok = Tokenizer(model)

    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="never", split=bool(trainer.split_by_whitespace)
    )
    decode = [decoders.Replace("▁", " ")]
    if byte_fallback:
        decode.append(decoders.ByteFallback())
    decode.append(decoders.Fuse())
    if spec.add_dummy_prefix:
        decode.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(decode)

    # Control pieces (<s>, </s>, ...) are special; user-defined pieces are matched verbatim.
    control = [AddedToken(p.piece, normalized=False, special=True) for p in proto.pieces if p.type == 3]
    user = [AddedToken(p.piece, normalized=False, special=False) for p in proto.pieces if p.type == 4]
    tok.add_special_tokens(control)
    tok.add_tokens(user)

    def piece(index: int) -> str | None:
        return proto.pieces[index].piece if 0 <= index < len(proto.pieces) else None

    eod = piece(trainer.eos_id)
    if eod is None:
        raise ValueError(f"{model_file}: the SentencePiece model has no EOS piece (eos_id={trainer.eos_id})")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=eod,  # see the module docstring: documents follow EOD, there is no BOS in training
        eos_token=eod,
        unk_token=unk_piece,
        pad_token=piece(trainer.pad_id),
        clean_up_tokenization_spaces=False,
    )


def _load_hf(path: str, ours):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if os.path.isdir(path):
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    eos = ours._tok.id_to_token(ours.eod)
    bos = ours._tok.id_to_token(ours.bos) if ours.bos is not None else None
    return PreTrainedTokenizerFast(
        tokenizer_file=path, eos_token=eos, bos_token=bos, clean_up_tokenization_spaces=False
    )
