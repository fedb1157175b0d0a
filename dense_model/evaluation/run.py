"""Run lm-eval on a dense_model checkpoint: lm-eval's own ``run`` command with our model plugged in.

    toolkits/evaluation/run_lm_eval.sh CHECKPOINT TASKS [lm-eval options]
    python -m dense_model.evaluation.run CHECKPOINT TASKS [lm-eval options]
    torchrun --nproc-per-node 2 -m dense_model.evaluation.run CHECKPOINT TASKS ...     # TP=2

CHECKPOINT is a run directory, its checkpoints/ folder or one iter_NNNNNNN folder. TASKS is a
comma-separated list of lm-eval task names, or .yaml task files. Every other option goes to
``lm-eval run`` unchanged (``--num_fewshot``, ``--batch_size``, ``--limit``, ``--include_path``,
``--output_path``, ``--log_samples``, ``--model_args dtype=float32``, ``--seed`` ...), so the results
JSON (under --output_path) and the printed table are lm-eval's standard ones. ``--batch_size``
defaults to 8 here (lm-eval's default is 1). The harness itself: dense_model/evaluation/harness.py.

Offline by default: HF_DATASETS_OFFLINE and HF_HUB_OFFLINE are set to 1 unless already set, so
tasks read the local Hugging Face cache (fill it on a machine with network access first, with
HF_DATASETS_OFFLINE=0) or local JSONL tasks (examples/lm_eval_tasks/).

``--every-checkpoint`` (CHECKPOINT a run or study directory) scores every saved iteration not yet
scored, each into RUN_DIR/lm_eval/iter_NNNNNNN (``--slurm``: one SLURM array task per iteration);
see dense_model/evaluation/every.py.

A checkpoint path that is missing or not ours, and a task lm-eval does not know, stop before the
model is loaded with a one-line error (exit status 2).
"""

from __future__ import annotations

import sys

from dense_model.checkpoint import CheckpointError, resolve_checkpoint
from dense_model.evaluation import harness

USAGE = "usage: run_lm_eval.sh CHECKPOINT TASKS [lm-eval run options]"
OWN_OPTIONS = ("--model", "-M", "--tasks", "-t")


def _fail(message: str) -> int:
    print(f"run_lm_eval: error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + (__doc__ or ""))
        return 0
    if len(argv) < 2 or argv[1].startswith("-"):
        return _fail(f"give a checkpoint and a task list first\n{USAGE}")
    checkpoint, tasks, rest = argv[0], argv[1], argv[2:]
    clash = [a for a in rest if a.split("=", 1)[0] in OWN_OPTIONS]
    if clash:
        return _fail(f"{', '.join(clash)}: the model and the tasks are the first two arguments\n{USAGE}")

    if "--every-checkpoint" in rest:
        from dense_model.evaluation import every

        try:
            return every.main(checkpoint, tasks, [a for a in rest if a != "--every-checkpoint"])
        except every.EveryCheckpointError as err:
            return _fail(str(err))

    try:
        folder = resolve_checkpoint(checkpoint)
    except CheckpointError as err:
        return _fail(str(err))

    try:
        return harness.evaluate(folder, tasks, rest)
    except harness.UnknownTasks as err:
        return _fail(str(err))


if __name__ == "__main__":
    sys.exit(main())
