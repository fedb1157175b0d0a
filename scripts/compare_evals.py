"""Side-by-side markdown table of several lm-eval runs, for the paper-style comparison of activations.

    python scripts/compare_evals.py evals/swiglu evals/polynorm evals/polyrelu
    python scripts/compare_evals.py a/results_2026-01-01T10-00-00.json b/results_*.json \\
        --labels SwiGLU,PolyNorm --metric hellaswag=acc --all-metrics --stderr -o table.md

Each argument is a results JSON written by lm-eval (run_lm_eval.sh or lm-eval's own ``--output_path``)
or a folder searched for them (the newest ``results_*.json`` below it). One row per run, labelled
by --labels, else by the run's activation and iteration (from our adapter's model info), else by
lm-eval's model name. One column per task: its headline metric (acc_norm, else acc, else
exact_match, else the first one; --metric TASK=METRIC overrides, --all-metrics shows every one).
Accuracy-like metrics (fractions where higher is better) are shown in percent with one decimal,
and their mean over the tasks is the last column, "avg" (as in the paper's "average over six
downstream tasks"); perplexities and the like are shown as they are. A run that lacks a task
gets "-".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PREFERRED = ("acc_norm", "acc", "exact_match", "f1", "mcc")


def find_results(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(path.rglob("results_*.json"), key=lambda p: (p.name, str(p)))
        if found:
            return found[-1]  # names carry an ISO timestamp: the last is the newest
        raise SystemExit(f"compare_evals: no results_*.json under {path}")
    raise SystemExit(f"compare_evals: {path} does not exist")


def load_run(path: Path) -> dict:
    data = json.loads(path.read_text())
    if "results" not in data:
        raise SystemExit(f"compare_evals: {path} is not an lm-eval results file (no 'results' key)")
    return data


def default_label(data: dict, path: Path) -> str:
    config = data.get("config") or {}
    activation = config.get("dense_model_activation")
    if activation:
        iteration = config.get("dense_model_iteration")
        return f"{activation} (iter {iteration})" if iteration is not None else activation
    return str(data.get("model_name") or config.get("model") or path.parent.name)


def task_metrics(entry: dict) -> dict[str, float]:
    """{"acc": 0.5, "exact_match (strip)": 0.1, ...} from one results entry; stderr kept as "name_stderr"."""
    out = {}
    for key, value in entry.items():
        if "," not in key:
            continue
        name, filt = key.split(",", 1)
        label = name if filt == "none" else f"{name} ({filt})"
        out[label] = value
    return out


def headline(metrics: dict[str, float], chosen: str | None) -> list[str]:
    names = [m for m in metrics if "_stderr" not in m]
    if chosen:
        return [m for m in names if m == chosen or m.startswith(chosen + " (")]
    for preferred in PREFERRED:
        for name in names:
            if name == preferred or name.startswith(preferred + " ("):
                return [name]
    return names[:1]


def is_accuracy(task: str, metric: str, runs: list[dict]) -> bool:
    base = metric.split(" (")[0]
    for data in runs:
        better = (data.get("higher_is_better") or {}).get(task, {}).get(base)
        value = task_metrics(data["results"].get(task, {})).get(metric)
        if isinstance(value, (int, float)) and better is not None:
            return bool(better) and 0.0 <= value <= 1.0
    return False


def fmt(value, accuracy: bool, stderr=None) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    text = f"{100 * value:.1f}" if accuracy else f"{value:.4g}"
    if isinstance(stderr, (int, float)):
        text += f" ± {100 * stderr:.1f}" if accuracy else f" ± {stderr:.2g}"
    return text


def build_table(
    runs: list[dict], labels: list[str], chosen: dict[str, str], all_metrics: bool, stderr: bool
) -> str:
    tasks: list[str] = []
    for data in runs:
        for task, entry in data["results"].items():
            if task not in tasks and any("_stderr" not in m for m in task_metrics(entry)):
                tasks.append(task)
    columns: list[tuple[str, str]] = []
    for task in sorted(tasks):
        metrics: dict[str, float] = {}
        for data in runs:
            metrics.update(task_metrics(data["results"].get(task, {})))
        picked = (
            [m for m in metrics if "_stderr" not in m] if all_metrics else headline(metrics, chosen.get(task))
        )
        columns += [(task, m) for m in picked]
    accuracy = {col: is_accuracy(col[0], col[1], runs) for col in columns}
    show_avg = sum(accuracy.values()) > 1

    header = ["run"] + [f"{task} {metric}" for task, metric in columns]
    if show_avg:
        header.append("avg")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for data, label in zip(runs, labels):
        cells, scores = [label], []
        for task, metric in columns:
            values = task_metrics(data["results"].get(task, {}))
            value = values.get(metric)
            err = values.get(metric.replace(" (", "_stderr (", 1) if " (" in metric else metric + "_stderr")
            cells.append(fmt(value, accuracy[(task, metric)], err if stderr else None))
            if accuracy[(task, metric)] and isinstance(value, (int, float)):
                scores.append(value)
        if show_avg:
            n_acc = sum(accuracy.values())
            cells.append(f"{100 * sum(scores) / len(scores):.1f}" if len(scores) == n_acc else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="lm-eval results JSON files, or folders holding them")
    parser.add_argument("--labels", help="comma-separated row labels, one per run")
    parser.add_argument(
        "--metric", action="append", default=[], metavar="TASK=METRIC", help="metric shown for a task"
    )
    parser.add_argument("--all-metrics", action="store_true", help="one column per metric of every task")
    parser.add_argument("--stderr", action="store_true", help="add lm-eval's standard errors")
    parser.add_argument("-o", "--output", help="also write the table to this file")
    args = parser.parse_args(argv)

    paths = [find_results(Path(p)) for p in args.results]
    runs = [load_run(p) for p in paths]
    labels = args.labels.split(",") if args.labels else [default_label(d, p) for d, p in zip(runs, paths)]
    if len(labels) != len(runs):
        parser.error(f"--labels has {len(labels)} names for {len(runs)} runs")
    chosen = {}
    for item in args.metric:
        task, sep, metric = item.partition("=")
        if not sep:
            parser.error(f"--metric {item!r} is not TASK=METRIC")
        chosen[task] = metric
    table = build_table(runs, labels, chosen, args.all_metrics, args.stderr)
    sys.stdout.write(table)
    if args.output:
        Path(args.output).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
