"""Tokenise RedPajama-style JSON lines into Megatron mmap datasets (.bin/.idx).

Drop-in for Megatron-LM's tools/preprocess_data.py (same flags, same PREFIX_{key}_document names),
plus zstd/gzip input, resume after a crash, bad-line skipping, and per-subset datasets with a blend:

    python toolkits/pretrain_data_preprocessing/preprocess_data.py \\
        --input /data/RedPajama-1T --output-prefix /data/tokens/red \\
        --tokenizer-type sentencepiece --tokenizer-model tokenizer.model \\
        --append-eod --workers 16 --split-by-subset

Input may also be Parquet files, Arrow files / `save_to_disk` folders, or a Hugging Face dataset
from the local cache (`--hf-dataset NAME --hf-split train`). On a cluster, run the same command as
N tasks (`--task-index I --num-tasks N`, or `--slurm-array` in a SLURM job array): each tokenises its
share, the last one merges (see scripts/slurm/preprocess_array.sbatch). The array's variables are read
only with `--slurm-array`: an array of one task per dataset (each its own --output-prefix) tokenises
all of each.

Rerun the same command after a crash or Ctrl-C: finished shards are kept, the rest is redone.
The logic lives in dense_model/data/preprocess/ (this is its command line).
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = p.add_argument_group("input")
    g.add_argument(
        "--input",
        nargs="+",
        default=[],
        help="files, folders (recursive) or globs of .jsonl/.json (optionally .zst/.gz compressed), "
        ".parquet, or .arrow (a datasets save_to_disk folder or cache)",
    )
    g.add_argument("--hf-dataset", help="a Hugging Face dataset name, read offline from the local cache")
    g.add_argument("--hf-split", default="train", help="the split of --hf-dataset")
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
        "--subset-from",
        choices=["record", "layout"],
        default="record",
        help="with --split-by-subset: record (red_pajama_subset/meta fields, else the folder) or layout "
        "(the folder or file name alone, RedPajama's download layout: each subset is then merged, and "
        "its shards deleted, as soon as its files are tokenised)",
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
        "--task-index",
        type=int,
        default=None,
        help="this task's share of the work when N tasks run the same command (default 0)",
    )
    g.add_argument(
        "--num-tasks",
        type=int,
        default=None,
        help="how many tasks share the work (default 1); the last to finish merges",
    )
    g.add_argument(
        "--slurm-array",
        action="store_true",
        help="the tasks of this SLURM job array share the work: --task-index and --num-tasks from "
        "SLURM_ARRAY_TASK_ID (less SLURM_ARRAY_TASK_MIN) and SLURM_ARRAY_TASK_COUNT",
    )
    g.add_argument(
        "--merge-only", action="store_true", help="tokenise nothing; merge once every task's shards are done"
    )
    g.add_argument(
        "--debug-batch-delay",
        type=float,
        default=0.0,
        help="debugging: seconds to sleep after each encoded batch and merged output (to watch or "
        "interrupt a slow run)",
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
    if not args.input and not args.hf_dataset:
        p.error("give --input or --hf-dataset")
    return args


def array_task(args: argparse.Namespace, env=os.environ) -> tuple[int, int]:
    """(task index, number of tasks): the flags', or with --slurm-array the SLURM array's. Raises
    ValueError (one line naming the variable or flag and the fix) when they cannot be used."""
    if not args.slurm_array:
        return (0 if args.task_index is None else args.task_index), (args.num_tasks or 1)
    if args.task_index is not None or args.num_tasks is not None:
        raise ValueError(
            "--slurm-array sets --task-index and --num-tasks from the array: give one or the other"
        )
    try:
        task_id, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
        first, step = int(env.get("SLURM_ARRAY_TASK_MIN", 0)), int(env.get("SLURM_ARRAY_TASK_STEP", 1) or 1)
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"--slurm-array: SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT unset or not numbers ({err}); "
            "run it as a task of `sbatch --array=0-N`, or drop --slurm-array"
        ) from None
    index, off_step = divmod(task_id - first, step)
    if off_step or not 0 <= index < count:  # a list such as --array=1,5,9 has no index 0..N-1
        raise ValueError(
            f"--slurm-array: array task {task_id} is not one of {count} evenly spaced tasks from "
            f"{first}; submit a range (sbatch --array=0-{count - 1}) or give --task-index/--num-tasks"
        )
    return index, count


def main(argv=None) -> int:
    from dense_model.data.jsonl import BadLineError
    from dense_model.data.preprocess.config import NoDocumentsError, PreprocessConfig, ResumeError, Terminated
    from dense_model.data.preprocess.run import preprocess

    args = parse_args(argv)
    try:
        task_index, num_tasks = array_task(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.slurm_array and num_tasks == 1 and int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)) > 1:
        print(
            "note: this SLURM array task tokenises all of its input into its --output-prefix "
            "(--slurm-array shares one run among the array's tasks)",
            file=sys.stderr,
        )
    cfg = PreprocessConfig(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        json_keys=args.json_keys,
        append_eod=args.append_eod,
        workers=args.workers,
        split_by_subset=args.split_by_subset,
        subset_from=args.subset_from,
        blend_weighting=args.blend_weighting,
        strict=args.strict,
        shard_size_mb=args.shard_size_mb,
        progress=False if args.no_progress else None,
        restart=args.restart,
        keep_shards=args.keep_shards,
        log_interval=args.log_interval,
        hf_dataset=args.hf_dataset,
        hf_split=args.hf_split,
        task_index=task_index,
        num_tasks=num_tasks,
        merge_only=args.merge_only,
        batch_delay=args.debug_batch_delay,
    )
    try:
        preprocess(cfg)
    except Terminated as err:
        return 128 + err.signum
    except KeyboardInterrupt:
        return 130
    except ResumeError as err:  # the work folder is another run's, or another process works on it
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (BadLineError, NoDocumentsError, ValueError, FileNotFoundError) as err:  # the input or options
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # e.g. an array task whose partners never ran: not the input's fault
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
