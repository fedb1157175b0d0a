"""Merge Megatron mmap datasets into one, streaming (bounded memory whatever their size).

    python toolkits/pretrain_data_preprocessing/merge_datasets.py --input DIR_OR_PREFIX [...] \\
        --output-prefix out/merged

Megatron-LM's merge semantics: a folder contributes every .bin/.idx pair in it, sorted by name;
prefixes are taken in the order given; documents follow one another; token dtypes must agree.
The output is written under temporary names and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    # The checkout this tool belongs to, whether or not it was pip-installed.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from dense_model.cli import run_reporting_errors
    from dense_model.data.indexed import find_dataset_prefixes, merge_datasets

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="folders (all .bin/.idx pairs inside, sorted) and/or dataset prefixes, in merge order",
    )
    p.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin/.idx")
    args = p.parse_args(argv)

    def merge() -> None:
        prefixes = []
        for item in args.input:
            if os.path.isdir(item):
                prefixes.extend(find_dataset_prefixes(item))
            else:
                prefixes.append(item[:-4] if item.endswith((".bin", ".idx")) else item)
        result = merge_datasets(prefixes, args.output_prefix)
        print(
            f"merged {len(prefixes)} datasets into {result.prefix}.bin/.idx: {result.documents:,} documents, "
            f"{result.tokens:,} tokens, {result.dtype.__name__}"
        )

    return run_reporting_errors(merge)


if __name__ == "__main__":
    sys.exit(main())
