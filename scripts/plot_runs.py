"""Training loss, validation perplexity and downstream accuracy against tokens for several runs.

    python scripts/plot_runs.py runs/1b_swiglu runs/1b_polynorm runs/1b_polyrelu -o activations.png
    python scripts/plot_runs.py studies/cpu_small/runs/* --band ci95 -o study.png   # seeds as bands

Panels: training loss; validation perplexity of the training blend's held-out split and of each
named set (data.validation_sets: valid/NAME/ppl records); downstream accuracy per lm-eval task (the
headline metric, as scripts/compare_evals.py picks it) from the results JSON under RUN/lm_eval/ or
RUN/evals/ (a point at the checkpoint's tokens: the iteration our adapter or the study stamps in
it, else the run's last step; one point per iteration, --every-checkpoint's where a study's final
results give the same one; a job's unpublished staging folders are left out) and from the in-loop
evaluations in metrics.jsonl (evaluation.in_loop: downstream/TASK/METRIC records, at their tokens).
Written as OUTPUT (PNG) and the same name .svg.
With --band minmax|ci95, runs with the same label (the activation, or --labels) are one mean line
with a band: min..max over the runs, or the mean's 95% interval (Student t over seeds); steps
missing from a run are left out of its group's curve.

Each RUN_DIR's metrics.jsonl is read: a resumed run's has each step once (the trainer moves a
killed attempt's records past the resume point to metrics.attempt-K.jsonl, which is not plotted;
in older run directories the last record of a step wins); the legend is the run's model.activation from its config.yaml (or --labels). Training loss
can be smoothed with an exponential moving average (--smooth 0.9); tokens are shown in K, M or B.
Runs with a learnable activation (PolyNorm, PolyReLU) also get OUTPUT_coefficients.png: the
coefficients a0..ar of every layer against tokens (the activation_stats records of metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from compare_evals import headline, task_metrics  # scripts/: the same headline metric per task


def read_run(run_dir: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(
            f"{metrics} does not exist: is {run_dir} a run directory (run_dir= in its config)?"
        )
    train, valid = {}, {}
    for n, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            print(f"{metrics}:{n}: not JSON, skipped", file=sys.stderr)
            continue
        if "loss" in record:
            train[record["step"]] = record
        if "val_loss" in record:
            valid[record["step"]] = record
    return train, valid


def activation_of(run_dir: Path) -> str:
    """The run's model.activation from its config.yaml (the run folder's name without one)."""
    import yaml

    config = run_dir / "config.yaml"
    if config.is_file():
        cfg = yaml.safe_load(config.read_text()) or {}
        activation = (cfg.get("model") or {}).get("activation")
        if activation:
            return str(activation)
    return run_dir.name


def label_for(run_dir: Path) -> str:
    activation = activation_of(run_dir)
    return run_dir.name if activation == run_dir.name else f"{activation} ({run_dir.name})"


def ema(values: list[float], alpha: float) -> list[float]:
    if alpha <= 0:
        return values
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out


def read_coefficients(run_dir: Path) -> dict[str, dict[int, tuple[int, float]]]:
    """'layerL/aK' -> {step: (tokens, value)} from the run's activation_stats records."""
    out: dict[str, dict[int, tuple[int, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        for key, value in record.get("activation_stats", {}).items():
            if key.split("/")[-1][:1] == "a" and key.split("/")[-1][1:].isdigit():
                out.setdefault(key, {})[record["step"]] = (record["tokens"], value)
    return out


def plot_coefficients(run_dirs: list[Path], labels: list[str], output: Path) -> Path | None:
    """One panel per layer, one line per (run, coefficient); None when no run has coefficients."""
    import matplotlib.pyplot as plt

    runs = [(label, read_coefficients(run)) for run, label in zip(run_dirs, labels)]
    layers = sorted({int(key.split("/")[0][len("layer") :]) for _, coefs in runs for key in coefs})
    if not layers:
        return None
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        for label, coefs in runs:
            for key in sorted(k for k in coefs if k.startswith(f"layer{layer}/")):
                steps = sorted(coefs[key])
                ax.plot(
                    [coefs[key][s][0] for s in steps],
                    [coefs[key][s][1] for s in steps],
                    label=f"{label} {key.split('/')[1]}",
                )
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("activation coefficients a0..ar")
    fig.tight_layout()
    path = output.with_name(output.stem + "_coefficients.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def step_records(run_dir: Path):
    """The records of the run's metrics.jsonl that carry a step (a line that is not JSON is skipped;
    none without the file: a folder of lm-eval results alone)."""
    metrics = run_dir / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            yield record


def read_named_sets(run_dir: Path) -> dict[str, dict[int, dict]]:
    """'validation' (the blend's held-out split, val_ppl) and each named set -> {step: {tokens, ppl}}."""
    out: dict[str, dict[int, dict]] = {}
    for record in step_records(run_dir):
        point = {"tokens": record.get("tokens", 0)}
        if "val_ppl" in record:
            out.setdefault("validation", {})[record["step"]] = {**point, "ppl": record["val_ppl"]}
        for key, value in record.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "valid" and parts[2] == "ppl":
                out.setdefault(parts[1], {})[record["step"]] = {**point, "ppl": value}
    return out


def results_files(run_dir: Path) -> list[Path]:
    """The published lm-eval results files of a run, weakest first: RUN/evals, the study's under
    RUN/lm_eval, then RUN/lm_eval/iter_N (--every-checkpoint's series), so where two give one
    iteration the series' point is plotted. A folder whose name starts with "." (a job's staging or
    set-aside folder, ``.iter_N.tmp-*``, ``.iter_N.old``) is not published: left out."""
    found = []
    for rank, folder in enumerate(("evals", "lm_eval")):
        root = run_dir / folder
        for path in sorted(root.rglob("results*.json")):
            parts = path.relative_to(root).parts[:-1]
            if any(part.startswith(".") for part in parts):
                continue
            series = folder == "lm_eval" and bool(parts) and parts[0].startswith("iter_")
            found.append((rank + series, path))
    return [path for _, path in sorted(found, key=lambda item: item[0])]


def read_downstream(run_dir: Path, train: dict[int, dict]) -> dict[str, dict[int, dict]]:
    """'task/metric' -> {iteration: {tokens, score}} from lm-eval results under RUN/lm_eval or RUN/evals
    (``results_files``; one point per iteration: a later file's replaces an earlier one's, said on
    stderr when the scores differ)."""
    last = max(train, default=0)
    per_step = train[last]["tokens"] / last if last else 0
    out: dict[str, dict[int, dict]] = {}
    source: dict[tuple[str, int], Path] = {}
    for path in results_files(run_dir):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            print(f"{path}: unreadable lm-eval results, skipped", file=sys.stderr)
            continue
        config = data.get("config") or {}
        iteration = config.get("dense_model_iteration")
        if iteration is None:
            iteration = (data.get("dense_model_study") or {}).get("iteration", last)
        for task, entry in (data.get("results") or {}).items():
            metrics = task_metrics(entry)
            for name in headline(metrics, None):
                if isinstance(metrics[name], (int, float)):
                    key, score = f"{task}/{name}", float(metrics[name])
                    before = out.get(key, {}).get(iteration)
                    if before is not None and before["score"] != score:
                        print(
                            f"{path}: {key} at iteration {iteration} is {score:g}, {source[key, iteration]} "
                            f"has {before['score']:g} (other tasks or options?); plotting {score:g}",
                            file=sys.stderr,
                        )
                    out.setdefault(key, {})[iteration] = {"tokens": iteration * per_step, "score": score}
                    source[key, iteration] = path
    for task, points in read_in_loop(run_dir).items():
        metrics = {name: None for name in points}
        for name in headline(metrics, None):
            for step, point in points[name].items():
                out.setdefault(f"{task}/{name}", {})[step] = point
    return out


def read_in_loop(run_dir: Path) -> dict[str, dict[str, dict[int, dict]]]:
    """task -> metric -> {step: {tokens, score}} from metrics.jsonl's in-loop evaluation records
    (evaluation.in_loop: downstream/TASK/METRIC keys)."""
    out: dict[str, dict[str, dict[int, dict]]] = {}
    for record in step_records(run_dir):
        for key, value in record.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "downstream" and isinstance(value, (int, float)):
                point = {"tokens": record.get("tokens", 0), "score": float(value)}
                out.setdefault(parts[1], {}).setdefault(parts[2], {})[record["step"]] = point
    return out


def band(values: list[float], kind: str) -> tuple[float, float, float]:
    """(mean, low, high) over runs: min..max, or the mean's 95% interval (Student t, n-1 dof)."""
    import math

    n = len(values)
    mean = sum(values) / n
    if kind == "minmax":
        return mean, min(values), max(values)
    if n < 2:
        return mean, mean, mean
    from scipy.stats import t as student_t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(student_t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def plot_panels(runs: list[dict], band_kind: str | None, smooth: float = 0.0):
    """runs: [{label, train, sets, downstream}] -> (figure, {panel title: {label: {"line", "band"}}}).
    Without ``band_kind`` one line per run (labels may repeat); with it one mean line and one band
    (a matplotlib PolyCollection) per label."""
    import matplotlib.pyplot as plt

    most = max((r["tokens"] for run in runs for r in run["train"].values()), default=1)
    scale, unit = next((s, u) for s, u in ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")) if most >= s)
    panels = [("training loss", lambda run: {s: (r["tokens"], r["loss"]) for s, r in run["train"].items()})]
    for name in sorted({n for run in runs for n in run["sets"]}, key=lambda n: (n != "validation", n)):
        panels.append(
            (
                f"{name} perplexity",
                lambda run, name=name: {
                    s: (r["tokens"], r["ppl"]) for s, r in run["sets"].get(name, {}).items()
                },
            )
        )
    for task in sorted({t for run in runs for t in run["downstream"]}):
        panels.append(
            (
                task,
                lambda run, task=task: {
                    s: (r["tokens"], r["score"]) for s, r in run["downstream"].get(task, {}).items()
                },
            )
        )
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["label"], []).append(run)
    drawn: dict[str, dict[str, dict]] = {}
    for ax, (title, series) in zip(axes.flat, panels):
        drawn[title] = {}
        marker = "-" if title == "training loss" else "o-"
        if band_kind is None:
            for i, run in enumerate(runs):
                points = series(run)
                steps = sorted(points)
                if not steps:
                    continue
                values = [points[s][1] for s in steps]
                if title == "training loss":
                    values = ema(values, smooth)
                (line,) = ax.plot(
                    [points[s][0] / scale for s in steps], values, marker, ms=3, label=run["label"]
                )
                drawn[title][f"{run['label']}#{i}"] = {"line": line, "band": None}
        else:
            for label, members in groups.items():
                curves = [series(run) for run in members]
                steps = sorted(set.intersection(*(set(c) for c in curves)))
                if not steps:
                    continue
                stats = [band([c[s][1] for c in curves], band_kind) for s in steps]
                tokens = [curves[0][s][0] / scale for s in steps]
                (line,) = ax.plot(
                    tokens, [m for m, _, _ in stats], marker, ms=3, label=f"{label} (n={len(members)})"
                )
                fill = ax.fill_between(
                    tokens,
                    [lo for _, lo, _ in stats],
                    [hi for _, _, hi in stats],
                    color=line.get_color(),
                    alpha=0.2,
                )
                drawn[title][label] = {"line": line, "band": fill}
        ax.set_xlabel(f"tokens ({unit})" if unit else "tokens")
        ax.set_title(title if band_kind is None else f"{title} (band: {band_kind})")
        ax.grid(alpha=0.3)
        if drawn[title]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig, drawn


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with metrics.jsonl)")
    parser.add_argument(
        "-o", "--output", type=Path, default=Path("runs.png"), help="PNG to write (and the same name .svg)"
    )
    parser.add_argument(
        "--labels", nargs="*", help="legend labels, one per run (runs with one label form a band)"
    )
    parser.add_argument(
        "--smooth", type=float, default=0.0, help="EMA factor for the training loss (e.g. 0.9)"
    )
    parser.add_argument(
        "--band",
        choices=("minmax", "ci95"),
        help="runs with the same label (seeds) as a mean line and a band: min..max or a 95%% interval",
    )
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f"--labels has {len(args.labels)} entries for {len(args.runs)} runs")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for i, run in enumerate(args.runs):
        try:
            train, _ = read_run(run)
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        label = args.labels[i] if args.labels else (activation_of(run) if args.band else label_for(run))
        runs.append(
            {
                "label": label,
                "train": train,
                "sets": read_named_sets(run),
                "downstream": read_downstream(run, train),
            }
        )
    fig, _ = plot_panels(runs, args.band, args.smooth)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=120)
    svg = args.output.with_suffix(".svg")
    fig.savefig(svg)
    plt.close(fig)
    print(f"wrote {args.output} and {svg}")
    labels = args.labels or [label_for(run) for run in args.runs]
    coefficients = plot_coefficients(args.runs, labels, args.output)
    if coefficients:
        print(f"wrote {coefficients}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
