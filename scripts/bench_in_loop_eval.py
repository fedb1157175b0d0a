"""In-loop evaluation (evaluation.in_loop) against run_lm_eval.sh on the same requests.

Loads one checkpoint (default: the demo's, runs/demo_dynamics) and times, alternating, REPEATS times:

  * ``in-loop``:   ``InLoopEvaluator.evaluate()`` on the model, as the trainer calls it every
                   ``interval`` steps (tasks built once; random states kept; DP gather);
  * ``scoring``:   what run_lm_eval.sh spends on the same requests once it has started: lm-eval's
                   ``evaluate`` over our ``dense_model`` model on freshly loaded tasks (the same
                   ``limit``, ``num_fewshot``, seeds; lm-eval's default 100,000 bootstrap iterations);
  * ``run_lm_eval.sh``: the whole command in a new process (Python, imports, the checkpoint loaded,
                   the tasks indexed and built, then the scoring), whose start-up is its time minus
                   ``scoring``.

    python scripts/bench_in_loop_eval.py                                   # the demo's checkpoint
    python scripts/bench_in_loop_eval.py runs/demo_dynamics --tasks tiny_python_mc,tiny_python_ppl --repeats 5

Prints the medians, the min..max of each, and the ratio in-loop / scoring per repeat.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from dense_model.benchmarking import markdown_table, metadata_lines, run_metadata  # noqa: E402
from dense_model.config.schema import InLoopEvalConfig  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", default=str(REPO / "runs" / "demo_dynamics"))
    parser.add_argument("--tasks", default="tiny_python_mc")
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--include-path", default=str(REPO / "examples" / "lm_eval_tasks"))
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.chdir(REPO)  # the shipped tasks' data_files are relative to the repository root
    from lm_eval.evaluator import evaluate

    from dense_model.evaluation import DenseModelLM
    from dense_model.training.downstream import InLoopEvaluator, load_tasks

    in_loop = InLoopEvalConfig(
        tasks=args.tasks.split(","), interval=1, limit=args.limit, include_path=args.include_path
    )
    lm = DenseModelLM(pretrained=args.checkpoint, batch_size=in_loop.batch_size, dtype="float32")
    evaluator = InLoopEvaluator(lm.config, lm.model, lm.tokenizer, load_tasks(in_loop))
    command = ["bash", str(REPO / "toolkits" / "evaluation" / "run_lm_eval.sh"), args.checkpoint, args.tasks]
    command += ["--include_path", args.include_path, "--limit", str(args.limit)]

    # a command of its own: not this process's process-group rendezvous (initialised by the model load)
    dist_env = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in dist_env}
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # as many threads as the in-process runs
    times: dict[str, list[float]] = {"in-loop": [], "scoring": [], "run_lm_eval.sh": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        ours = evaluator.evaluate()
        times["in-loop"].append(time.perf_counter() - start)

        tasks = load_tasks(in_loop)  # run_lm_eval builds its tasks before it scores: not timed
        start = time.perf_counter()
        theirs = evaluate(lm=lm, task_dict=tasks, limit=args.limit, log_samples=False)
        times["scoring"].append(time.perf_counter() - start)

        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            sys.exit(f"run_lm_eval.sh failed ({done.returncode}):\n{done.stderr[-3000:]}")
        times["run_lm_eval.sh"].append(time.perf_counter() - start)
    same = all(
        abs(v - theirs["results"][k.split("/")[0]][k.split("/")[1] + ",none"]) < 1e-9 for k, v in ours.items()
    )

    print(metadata_lines(run_metadata()) + f"; {torch.get_num_threads()} threads")
    print(
        f"checkpoint {args.checkpoint}: {sum(p.numel() for p in lm.model.parameters()):,} parameters; tasks "
        f"{args.tasks}, limit {args.limit}; {args.repeats} alternating repeats; in-loop scores equal: {same}\n"
    )
    rows = [[name, f"{statistics.median(v):.2f}", f"{min(v):.2f}..{max(v):.2f}"] for name, v in times.items()]
    startup = [t - s for t, s in zip(times["run_lm_eval.sh"], times["scoring"])]
    rows.append(
        [
            "run_lm_eval.sh start-up (total - scoring)",
            f"{statistics.median(startup):.2f}",
            f"{min(startup):.2f}..{max(startup):.2f}",
        ]
    )
    ratios = [i / s for i, s in zip(times["in-loop"], times["scoring"])]
    rows.append(
        [
            "ratio in-loop / scoring",
            f"{statistics.median(ratios):.2f}",
            f"{min(ratios):.2f}..{max(ratios):.2f}",
        ]
    )
    print(markdown_table(["what", "median (s)", "min..max"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
