"""Tokenise RedPajama-style JSON lines into Megatron mmap datasets (.bin/.idx).

Drop-in for Megatron-LM's tools/preprocess_data.py (same flags, same PREFIX_{key}_document names),
plus zstd/gzip input, resume after a crash, bad-line skipping, and per-subset datasets with a blend:

    python toolkits/pretrain_data_preprocessing/preprocess_data.py \\
        --input /data/RedPajama-1T --output-prefix /data/tokens/red \\
        --tokenizer-type sentencepiece --tokenizer-model tokenizer.model \\
        --append-eod --workers 16 --split-by-subset

Input may also be Parquet files, Arrow files / `save_to_disk` folders, or a Hugging Face dataset
from the local cache (`--hf-dataset NAME --hf-split train`). On a cluster, run the same command as
N tasks (`--task-index I --num-tasks N`, or a SLURM job array): each tokenises its share, the last
one merges (see scripts/slurm/preprocess_array.sbatch).

Rerun the same command after a crash or Ctrl-C: finished shards are kept, the rest is redone.
The logic lives in dense_model/data/preprocess/ (the flags: its cli.py).
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
