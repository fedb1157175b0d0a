"""lm-eval's own ``run`` command on one dense_model checkpoint folder, in this process.

What ``run_lm_eval.sh CHECKPOINT TASKS`` does once the checkpoint is resolved, and what
``--every-checkpoint`` does for each iteration (lm-eval, torch and megatron-core imported once per
job, not once per iteration): ``evaluate(folder, tasks, rest)``. Offline unless the environment says
otherwise (HF_DATASETS_OFFLINE, HF_HUB_OFFLINE default to 1).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path

DEFAULT_BATCH_SIZE = "8"  # lm-eval's own default is 1


class UnknownTasks(ValueError):
    """lm-eval knows none of these task names; the message says how to list or include them."""


def evaluate(folder: str | Path, tasks: str, rest: list[str]) -> int:
    """``lm-eval run --model dense_model --model_args pretrained=FOLDER --tasks TASKS REST...``;
    0 when it ran, UnknownTasks when a task is unknown. The process group it made is destroyed."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import argparse

    from lm_eval._cli.run import Run
    from lm_eval.utils import setup_logging

    import dense_model.evaluation.adapter  # noqa: F401  registers the "dense_model" model
    from dense_model.parallel import destroy_parallel

    setup_logging()
    parser = argparse.ArgumentParser(prog="run_lm_eval.sh")
    Run.create(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["run", "--model", "dense_model", "--model_args", f"pretrained={folder}", "--tasks", tasks]
        + ["--batch_size", DEFAULT_BATCH_SIZE]
        + rest
    )
    try:
        with _task_index_of(args.tasks, args.include_path):
            args.func(args)
    except ValueError as err:
        if not str(err).startswith("Tasks not found"):
            raise
        missing = str(err).split(":", 1)[1].strip()
        raise UnknownTasks(
            f"lm-eval does not know the task(s) {missing}. List the known ones with `lm-eval ls tasks`; "
            "for local YAML tasks give their folder with --include_path DIR (e.g. examples/lm_eval_tasks) "
            "or the .yaml file itself as the task"
        ) from None
    finally:
        if "megatron.core.parallel_state" in sys.modules:
            destroy_parallel()
    return 0


@contextlib.contextmanager
def _task_index_of(tasks: str | list[str], include_path: str | None):
    """lm-eval indexes all of its ~14,000 built-in task files before every run (about 12 s on a
    2-core machine). When every task asked for is a plain task found under ``--include_path`` (the
    usual case for our local tasks), let lm-eval index that folder alone; otherwise change nothing."""
    import lm_eval.tasks

    from dense_model.training.downstream import local_tasks_only

    names = [
        name for item in ([tasks] if isinstance(tasks, str) else tasks) for name in item.split(",") if name
    ]
    local_only = local_tasks_only(names, include_path)
    if not local_only:
        yield
        return
    full = lm_eval.tasks.TaskManager
    lm_eval.tasks.TaskManager = functools.partial(full, include_defaults=False)  # read by lm-eval's run
    try:
        yield
    finally:
        lm_eval.tasks.TaskManager = full
