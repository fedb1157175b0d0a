"""Train a SentencePiece tokenizer from the same JSON-lines inputs as preprocessing.

    python toolkits/pretrain_data_preprocessing/train_tokenizer.py --input DATA/ \\
        --model-prefix out/tok --vocab-size 32000 --model-type bpe --max-documents 200000

Reads the inputs once, keeping a uniform random sample of at most `max_documents` documents
(reservoir sampling, seeded: memory is bounded by max_documents x max_document_chars whatever
the input size). Bad lines are skipped as in preprocessing. Each line of a sampled document is a
SentencePiece "sentence". Defaults follow Llama's tokenizer: BPE, byte fallback (no unknown
bytes), digits split, whitespace kept as is (code keeps its indentation), ids unk=0, bos=1, eos=2
and no pad.

Reading everything to sample it is the price of a uniform sample; for RedPajama-sized inputs pass a
representative subset of files.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from dense_model.data.jsonl import BadLineStats, LineSource, expand_inputs


@dataclass
class TokenizerTrainingResult:
    model_file: str
    vocab_file: str
    documents_seen: int
    documents_used: int
    bad: BadLineStats


def sample_documents(
    inputs: Sequence[str],
    max_documents: int,
    *,
    json_key: str = "text",
    seed: int = 1234,
    max_document_chars: int = 20_000,
) -> tuple[list[str], int, BadLineStats]:
    """Reservoir sample of documents (each cut to max_document_chars): (sample, documents seen, bad)."""
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    bad = BadLineStats()
    for path in expand_inputs(inputs):
        for number, offset, raw in LineSource(path):
            if not raw.strip():
                bad.blank_lines += 1
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                bad.add("invalid_utf8", path, number, offset)
                continue
            except (ValueError, RecursionError):
                bad.add("invalid_json", path, number, offset)
                continue
            text = record.get(json_key) if isinstance(record, dict) else None
            if not isinstance(record, dict) or json_key not in record:
                bad.add("missing_key", path, number, offset)
                continue
            if not isinstance(text, str):
                bad.add("not_string", path, number, offset)
                continue
            if not text.strip():
                bad.add("empty_text", path, number, offset)
                continue
            seen += 1
            text = text[:max_document_chars]
            if len(sample) < max_documents:
                sample.append(text)
            else:
                j = rng.randrange(seen)
                if j < max_documents:
                    sample[j] = text
    return sample, seen, bad


def _sentences(documents: Sequence[str]) -> Iterator[str]:
    for doc in documents:
        for line in doc.split("\n"):
            if line.strip():
                yield line


def train_sentencepiece(
    inputs: Sequence[str],
    model_prefix: str,
    *,
    vocab_size: int = 32000,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    max_documents: int = 200_000,
    json_key: str = "text",
    seed: int = 1234,
    character_coverage: float = 0.9995,
    max_document_chars: int = 20_000,
    num_threads: int | None = None,
    quiet: bool = True,
) -> TokenizerTrainingResult:
    """Train `model_prefix`.model/.vocab; see the module docstring."""
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"--model-type {model_type!r}: choose bpe or unigram")
    if vocab_size < 64:
        raise ValueError(
            f"--vocab-size {vocab_size} is too small (at least 64; byte fallback alone needs 259)"
        )
    documents, seen, bad = sample_documents(
        inputs, max_documents, json_key=json_key, seed=seed, max_document_chars=max_document_chars
    )
    if not documents:
        raise ValueError(f"no usable documents with key {json_key!r} in {list(inputs)}")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(documents),
            model_prefix=model_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            max_sentence_length=16384,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=num_threads or max(1, len(os.sched_getaffinity(0))),
            minloglevel=2 if quiet else 0,
        )
    except RuntimeError as err:
        raise ValueError(
            f"SentencePiece training failed ({err}). Its message says what to change: usually --vocab-size "
            "(larger than a small sample supports, or smaller than the characters to cover) or "
            "--character-coverage."
        ) from err
    return TokenizerTrainingResult(
        model_prefix + ".model", model_prefix + ".vocab", seen, len(documents), bad
    )
