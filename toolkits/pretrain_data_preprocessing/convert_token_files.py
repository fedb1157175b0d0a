"""Convert `dolma tokens` output (OLMo's flat token files, `part-*.npy`) to a Megatron mmap dataset.

    python toolkits/pretrain_data_preprocessing/convert_token_files.py --input part-00-00000.npy [...] \\
        --dtype uint16 --eos-id 0 --vocab-size 50280 --output-prefix data/olmoe_text_document

No re-tokenising: the tokens are copied as they are, one document per EOS-terminated run, streaming
(memory flat in the file size). A raw file (dolma's, no .npy header) needs --dtype; a real .npy
brings its own. The vocabulary comes from --vocab-size or the tokenizer (--tokenizer-type/-model).
Bad input (a missing file, a dtype too narrow for the vocabulary, an id >= the vocabulary) stops
with one `error:` line and exit status 2 before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    # The checkout this tool belongs to, whether or not it was pip-installed.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from dense_model.data.token_files import RAW_DTYPES, convert_token_files

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="token files, converted in this order")
    p.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin/.idx")
    p.add_argument("--dtype", choices=sorted(RAW_DTYPES), help="the raw files' token type (memmap_dtype)")
    p.add_argument(
        "--eos-id", type=int, required=True, help="the id that ends each document (OLMoE-mix: 50279)"
    )
    p.add_argument("--vocab-size", type=int, help="the tokenizer's vocabulary size (or give the tokenizer)")
    p.add_argument("--tokenizer-type", default="huggingface", help="sentencepiece or huggingface")
    p.add_argument("--tokenizer-model", help="the tokenizer the files were made with, for its vocabulary")
    p.add_argument("--chunk-tokens", type=int, default=1 << 24, help="tokens read at once (memory bound)")
    args = p.parse_args(argv)
    try:
        if args.chunk_tokens < 1:
            raise ValueError(f"--chunk-tokens {args.chunk_tokens}: give a positive number")
        vocab = args.vocab_size
        if vocab is None:
            if not args.tokenizer_model:
                raise ValueError(
                    "give --vocab-size or --tokenizer-model (the tokenizer the files were made with)"
                )
            from dense_model.data.tokenizers import build_tokenizer

            vocab = build_tokenizer(args.tokenizer_type, args.tokenizer_model).vocab_size
        result = convert_token_files(
            args.input,
            args.output_prefix,
            vocab_size=vocab,
            eos_id=args.eos_id,
            dtype=args.dtype,
            chunk_tokens=args.chunk_tokens,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"converted {len(args.input)} token files into {result.prefix}.bin/.idx: {result.documents:,} documents, "
        f"{result.tokens:,} tokens, {result.dtype.__name__}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
