"""Train a SentencePiece tokenizer (BPE or unigram) from JSON-lines inputs.

    python toolkits/pretrain_data_preprocessing/train_tokenizer.py --input DATA/ \\
        --model-prefix out/tokenizer --vocab-size 32000 --model-type bpe --max-documents 200000

Writes MODEL_PREFIX.model/.vocab (eos id 2, byte fallback by default), ready for
preprocess_data.py --tokenizer-type sentencepiece --tokenizer-model MODEL_PREFIX.model.
The logic lives in dense_model/data/train_tokenizer.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    # The checkout this tool belongs to, whether or not it was pip-installed.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from dense_model.cli import run_reporting_errors
    from dense_model.data.train_tokenizer import train_sentencepiece

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--input", nargs="+", required=True, help="files, folders or globs of .jsonl(.zst/.gz)")
    p.add_argument("--model-prefix", required=True, help="writes MODEL_PREFIX.model and MODEL_PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument(
        "--no-byte-fallback", action="store_true", help="map unseen characters to <unk> instead of bytes"
    )
    p.add_argument(
        "--max-documents", type=int, default=200_000, help="documents sampled (reservoir) for training"
    )
    p.add_argument(
        "--max-document-chars", type=int, default=20_000, help="each sampled document is cut to this"
    )
    p.add_argument("--json-key", default="text")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--num-threads", type=int, default=None, help="default: all available cores")
    args = p.parse_args(argv)

    def train() -> None:
        result = train_sentencepiece(
            args.input,
            args.model_prefix,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            byte_fallback=not args.no_byte_fallback,
            max_documents=args.max_documents,
            max_document_chars=args.max_document_chars,
            json_key=args.json_key,
            seed=args.seed,
            character_coverage=args.character_coverage,
            num_threads=args.num_threads,
        )
        print(
            f"trained {result.model_file} ({args.model_type}, vocab {args.vocab_size}) on "
            f"{result.documents_used:,} of {result.documents_seen:,} documents; skipped lines: {result.bad.total:,}"
        )

    return run_reporting_errors(train)


if __name__ == "__main__":
    sys.exit(main())
