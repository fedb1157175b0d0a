"""Tokenise RedPajama-style JSON lines (also Parquet, Arrow, a cached Hugging Face dataset) into
Megatron mmap datasets (.bin/.idx); a drop-in for Megatron-LM's tools/preprocess_data.py.

The usage, the flags and the behaviour (resume, SLURM arrays, the merge) are documented in
dense_model/data/preprocess/cli.py, which this script runs: `preprocess_data.py --help` prints them.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The checkout this tool belongs to, whether or not it was pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dense_model.data.preprocess.cli import main, parse_args  # noqa: E402

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
