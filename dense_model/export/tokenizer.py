"""The checkpoint's tokenizer as a Hugging Face tokenizer folder (``AutoTokenizer``, offline), exact.

A SentencePiece ``.model`` becomes a ``tokenizer.json`` (the Rust ``tokenizers`` backend) built
from the model's own normalizer and trainer spec:

  * normalizer: the model's precompiled charmap (e.g. ``nmt_nfkc``, which also maps ``\\n`` and
    ``\\t`` to spaces; none for identity normalisation), then, when the spec says so, strip and
    collapse runs of ASCII spaces (``remove_extra_whitespaces``) and the dummy ``▁`` prefix;
  * no pre-tokenizer: SentencePiece encodes the whole normalised text, so whitespace-only pieces
    (``allow_whitespace_only_pieces``, Llama's ``▁▁▁▁``) are kept whole;
  * model: BPE (merges recovered from the vocabulary, ranked by score) or Unigram (scores), with
    byte fallback; decoder: ``▁`` -> space, bytes -> UTF-8, ``<unk>`` -> `` ⁇ ``, dummy prefix off.

The tokenizer.json is then loaded back through ``AutoTokenizer`` and must give SentencePiece's ids
and text on ``probe_texts()``. Where it cannot be built (word/char models, user-defined pieces,
whitespace as suffix) or it differs (e.g. Unigram ties between equal-score segmentations of a
whitespace run, NFKC on ``\\r\\n`` without whitespace collapsing), the export ships the ``.model``
itself with tokenization_dense_model.py, a tokenizer class that runs SentencePiece (loaded with
``trust_remote_code=True``), and says so on stdout and in dense_model.json.

Special tokens. Our pretraining data has no BOS: each document ends with EOD (the SentencePiece
EOS), so EOD is also what a document follows. The exported tokenizer therefore adds nothing to
encoded text and names EOD as both ``eos_token`` and ``bos_token`` (the GPT-2 convention), so a
tool that prefixes BOS (lm-eval's ``hf`` model for an empty context or a rolling window) conditions
on EOD, exactly as dense_model's own lm-eval adapter does.

Hugging Face tokenizers (a folder or a ``tokenizer.json``) are re-saved with ``save_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from dense_model.data.tokenizers import build_tokenizer
from dense_model.export.tokenization_dense_model import DenseModelSentencePieceTokenizer

UNK_SURFACE = " \u2047 "  # how sentencepiece decodes the unknown piece
EXACT_MODULE = "tokenization_dense_model"  # the SentencePiece-running tokenizer shipped when needed


# The self-check's input: what lm-eval prompts and code are full of, and what tokenizers disagree on.
PROBE_TEXT = (
    "  Question: what does f(10) print?\n"
    "def f(n):\n    total = 0\n\tfor value in range(n):  # 10 ids\n"
    "        if value % 2 == 0:\r\n            total += value\r\n\r\n    return total   \n"
    "x = [1, 22, 333, 4444, 55555, 3.14159, 1e-9, 0x1F]\t\t\n"
    "日本語のテキスト、中文，한국어 — émigré naïve Ωμέγα Привет ﬁ ① ｆｕｌｌ\u3000\u00a0\u200b 🙂👍🏽\n"
    "\x00\x07\x1b[0m\x7f \U0001d518 \u2047 \ufeff \r \r\n  \n\n\n   "
)


def probe_texts() -> list[str]:
    """PROBE_TEXT, its lines, and runs of 1-20 spaces before, between and after code-like words."""
    texts = ["", PROBE_TEXT, *PROBE_TEXT.splitlines(keepends=True)]
    for n in range(1, 21):
        run = " " * n
        for word in ("a", "if x:", "x = 1", "\t"):
            texts += [run + word, word + run, word + run + word, word + "\n" + run + word + run]
            texts += [word + "\r\n" + run + word, run + "\n" + run]
    return texts


@dataclass
class ExportedTokenizer:
    """What export_tokenizer wrote: special ids for config.json and provenance for dense_model.json."""

    special_ids: dict
    provenance: dict


def export_tokenizer(
    tokenizer_type: str,
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    model_max_length: int | None = None,
) -> ExportedTokenizer:
    """Write a Hugging Face tokenizer for ``model_path`` into ``out_dir``, checked against ours.

    SentencePiece: a ``tokenizer.json`` when the model can be written as one and it gives
    SentencePiece's ids on ``probe_texts()``; otherwise ``tokenizer.model`` plus the class in
    tokenization_dense_model.py (runs SentencePiece itself; AutoTokenizer with trust_remote_code).
    """
    ours = build_tokenizer(tokenizer_type, str(model_path))
    out_dir = Path(out_dir)
    if ours.tokenizer_type != "sentencepiece":
        hf = _load_hf(str(model_path), ours)
        _save(hf, out_dir, model_max_length)
        return ExportedTokenizer(_special_ids(hf), _provenance(ours, "save_pretrained"))

    reason = fast_tokenizer_gap(str(model_path))
    if reason is None:
        hf = sentencepiece_to_hf(str(model_path))
        _save(hf, out_dir, model_max_length)
        mismatch = tokenizer_mismatch(ours, out_dir)
        if mismatch:
            reason = f"the tokenizer.json built from it differs from SentencePiece: {mismatch}"
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                (out_dir / name).unlink(missing_ok=True)
    if reason is None:
        print(f"export: tokenizer {model_path} -> tokenizer.json (checked id for id)", flush=True)
        return ExportedTokenizer(_special_ids(hf), _provenance(ours, "tokenizer.json"))
    hf = _exact_sentencepiece(str(model_path), out_dir, model_max_length)
    print(
        f"export: tokenizer {model_path} -> tokenizer.model run by SentencePiece "
        f"(AutoTokenizer needs trust_remote_code=True), because {reason}",
        flush=True,
    )
    return ExportedTokenizer(
        _special_ids(hf), {**_provenance(ours, "sentencepiece"), "why_not_tokenizer_json": reason}
    )


def _special_ids(hf) -> dict:
    return {"bos_token_id": hf.bos_token_id, "eos_token_id": hf.eos_token_id, "pad_token_id": hf.pad_token_id}


def _provenance(ours, exported_as: str) -> dict:
    """For dense_model.json: the tokenizer file the export was made from, its sha256 (of the .model
    file, as sha256sum prints it; of a folder: the resume fingerprint) and what was shipped."""
    sha256 = _sha256(ours.path) if os.path.isfile(ours.path) else ours.fingerprint()
    return {"source": ours.path, "type": ours.tokenizer_type, "sha256": sha256, "exported_as": exported_as}


def tokenizer_mismatch(ours, folder: str | os.PathLike, texts: list[str] | None = None) -> str | None:
    """The first of ``texts`` (default probe_texts()) on which the tokenizer saved in ``folder``
    (loaded as users load it, through AutoTokenizer) encodes or decodes differently from ``ours``."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=True)
    for text in probe_texts() if texts is None else texts:
        expected, got = ours.encode(text), hf(text, add_special_tokens=False, verbose=False)["input_ids"]
        if got != expected:
            at = next(
                (i for i, (x, y) in enumerate(zip(got, expected)) if x != y), min(len(got), len(expected))
            )
            return (
                f"{text[:80]!r}{'...' if len(text) > 80 else ''} encodes to ..."
                f"{hf.convert_ids_to_tokens(got[at : at + 6])} instead of ..."
                f"{hf.convert_ids_to_tokens(expected[at : at + 6])} (token {at})"
            )
        if hf.decode(expected) != ours.decode(expected):
            return f"the ids of {text[:80]!r} decode to {hf.decode(expected)[:80]!r} instead of {ours.decode(expected)[:80]!r}"
    return None


def fast_tokenizer_gap(model_file: str) -> str | None:
    """Why ``model_file`` cannot be written as a tokenizer.json at all (None: it can be tried)."""
    proto = _model_proto(model_file)
    if proto.trainer_spec.model_type not in (1, 2):
        return f"its model type is {proto.trainer_spec.model_type} (only BPE and Unigram have a tokenizer.json form)"
    if proto.trainer_spec.treat_whitespace_as_suffix:
        return "it puts whitespace at the end of pieces (treat_whitespace_as_suffix)"
    if any(p.type == 4 for p in proto.pieces):
        # SentencePiece matches user-defined pieces inside the normalised text; the tokenizers
        # library splits them out before normalising, which moves the dummy prefix.
        return "it has user-defined pieces"
    return None


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _model_proto(model_file: str):
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    return proto


def _save(hf, out_dir: Path, model_max_length: int | None) -> None:
    if model_max_length is not None:
        hf.model_max_length = int(model_max_length)
    hf.save_pretrained(str(out_dir))


def _exact_sentencepiece(model_file: str, out_dir: Path, model_max_length: int | None):
    """tokenizer.model + tokenization_dense_model.py, registered for AutoTokenizer (auto_map)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)

    def piece(index: int) -> str | None:
        return sp.id_to_piece(index) if index >= 0 else None

    eod = piece(sp.eos_id())
    hf = DenseModelSentencePieceTokenizer(
        vocab_file=model_file,
        bos_token=eod,
        eos_token=eod,
        unk_token=piece(sp.unk_id()),
        pad_token=piece(sp.pad_id()),
    )
    _save(hf, out_dir, model_max_length)
    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = DenseModelSentencePieceTokenizer.__name__
    config["auto_map"] = {
        "AutoTokenizer": [f"{EXACT_MODULE}.{DenseModelSentencePieceTokenizer.__name__}", None]
    }
    config_file.write_text(json.dumps(config, indent=2))
    shutil.copy2(Path(__file__).with_name(EXACT_MODULE + ".py"), out_dir / (EXACT_MODULE + ".py"))
    return hf


def sentencepiece_to_hf(model_file: str):
    """A ``PreTrainedTokenizerFast`` that encodes and decodes like the SentencePiece ``model_file``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE, Unigram
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    proto = _model_proto(model_file)
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
        # SentencePiece strips and collapses the ASCII space only (after the charmap), not the
        # tabs and newlines that normalizers.Strip would also remove under identity normalisation.
        steps += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))  # Prepend leaves an empty text empty, as SentencePiece
    steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    # No pre-tokenizer: SentencePiece encodes the whole normalised text at once. split_by_whitespace
    # only shapes training; splitting before each ▁ here would break whitespace-only pieces such as
    # "▁▁▁▁" (Llama's indentation pieces) into single "▁"s.
    tok.pre_tokenizer = None
    decode = [decoders.Replace("▁", " ")]
    if unk_piece is not None:
        decode.insert(0, decoders.Replace(unk_piece, UNK_SURFACE))  # SentencePiece's rendering of <unk>
    if byte_fallback:
        decode.append(decoders.ByteFallback())
    decode.append(decoders.Fuse())
    if spec.add_dummy_prefix or spec.remove_extra_whitespaces:  # as sentencepiece's decoder
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
