"""Tokenise RedPajama-style JSON lines into Megatron mmap datasets (.bin/.idx).

Drop-in for Megatron-LM's tools/preprocess_data.py (same flags, same PREFIX_{key}_document names),
plus zstd/gzip input, resume after a crash, bad-line skipping, and per-subset datasets with a blend:

    python toolkits/pretrain_data_preprocessing/preprocess_data.py \\
        --input /data/RedPajama-1T --output-prefix /data/tokens/red \\
        --tokenizer-type sentencepiece --tokenizer-model tokenizer.model \\
        --append-eod --workers 16 --split-by-subset

Rerun the same command after a crash or Ctrl-C: finished shards are kept, the rest is redone.
The logic lives in dense_model/data/preprocess.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = p.add_argument_group("input")
    g.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="files, folders (recursive) or globs of .jsonl/.json, optionally .zst/.gz compressed",
    )
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenise; one dataset per key")
    g.add_argument("--strict", action="store_true", help="stop at the first bad line instead of skipping it")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, help="sentencepiece or huggingface")
    g.add_argument(
        "--tokenizer-model",
        required=True,
        help="SentencePiece .model file, or a local Hugging Face folder / tokenizer.json",
    )
    g.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    g.add_argument(
        "--split-by-subset",
        action="store_true",
        help="one dataset per RedPajama subset (from red_pajama_subset, meta or the folder name) "
        "and PREFIX_blend.json for training",
    )
    g.add_argument(
        "--blend-weighting",
        choices=["tokens", "redpajama"],
        default="tokens",
        help="blend weights: the token counts found, or RedPajama-1T's proportions",
    )
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="worker processes")
    g.add_argument(
        "--shard-size-mb",
        type=float,
        default=None,
        help="cut plain files into shards of this size (default: total/128 within 0.25..256 MB); "
        "a compressed file is always one shard, so give several files to use several workers",
    )
    g.add_argument("--restart", action="store_true", help="discard the shards of an earlier unfinished run")
    g.add_argument("--keep-shards", action="store_true", help="keep PREFIX.shards/ after merging")
    g.add_argument(
        "--no-progress", action="store_true", help="no progress bar (it is off without a terminal)"
    )
    g.add_argument(
        "--log-interval",
        type=float,
        default=60.0,
        help="seconds between progress lines when there is no progress bar",
    )
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    return args


def main(argv=None) -> int:
    # The checkout this tool belongs to, whether or not it was pip-installed.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from dense_model.data.jsonl import BadLineError
    from dense_model.data.preprocess import NoDocumentsError, PreprocessConfig, ResumeError, preprocess

    args = parse_args(argv)
    cfg = PreprocessConfig(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        json_keys=args.json_keys,
        append_eod=args.append_eod,
        workers=args.workers,
        split_by_subset=args.split_by_subset,
        blend_weighting=args.blend_weighting,
        strict=args.strict,
        shard_size_mb=args.shard_size_mb,
        progress=False if args.no_progress else None,
        restart=args.restart,
        keep_shards=args.keep_shards,
        log_interval=args.log_interval,
    )
    try:
        preprocess(cfg)
    except KeyboardInterrupt:
        return 130
    except (BadLineError, NoDocumentsError, ResumeError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
