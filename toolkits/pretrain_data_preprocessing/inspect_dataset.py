"""Show what a Megatron mmap dataset holds and check that its .bin and .idx agree.

    python toolkits/pretrain_data_preprocessing/inspect_dataset.py out/red_text_document \\
        [--tokenizer-type sentencepiece --tokenizer-model tok.model] [--samples 3] [--full-scan]

Give dataset prefixes (with or without .bin/.idx) or a blend file (*.json: every dataset in it).
Exit status 1 if any dataset is inconsistent, 2 for bad input (a path that does not exist). The
logic lives in dense_model/data/inspect.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    # The checkout this tool belongs to, whether or not it was pip-installed.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from dense_model.cli import run_reporting_errors
    from dense_model.data.blend import load_blend
    from dense_model.data.inspect import format_report, inspect_dataset
    from dense_model.data.tokenizers import build_tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datasets", nargs="+", help="dataset prefixes, or blend .json files")
    p.add_argument("--tokenizer-type", default=None, help="sentencepiece or huggingface (to decode samples)")
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--samples", type=int, default=3, help="documents to decode")
    p.add_argument("--sample-chars", type=int, default=300)
    p.add_argument("--full-scan", action="store_true", help="check every token id against the vocabulary")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = p.parse_args(argv)

    def inspect() -> int:
        tokenizer = None
        if args.tokenizer_model:
            tokenizer = build_tokenizer(args.tokenizer_type or "sentencepiece", args.tokenizer_model)
        prefixes = []
        for item in args.datasets:
            prefixes.extend(load_blend(item)[0] if item.endswith(".json") else [item])
        reports = [
            inspect_dataset(
                prefix,
                tokenizer,
                samples=args.samples,
                sample_chars=args.sample_chars,
                full_scan=args.full_scan,
            )
            for prefix in prefixes
        ]
        if args.json:
            print(json.dumps(reports, indent=2))
        else:
            print("\n\n".join(format_report(r) for r in reports))
        return 1 if any(r["problems"] for r in reports) else 0

    return run_reporting_errors(inspect)


if __name__ == "__main__":
    sys.exit(main())
