"""Training loss and validation perplexity against tokens for several runs, on one PNG.

    python scripts/plot_runs.py runs/1b_swiglu runs/1b_polynorm runs/1b_polyrelu -o activations.png

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


def label_for(run_dir: Path) -> str:
    import yaml

    config = run_dir / "config.yaml"
    if config.is_file():
        cfg = yaml.safe_load(config.read_text()) or {}
        activation = (cfg.get("model") or {}).get("activation")
        if activation:
            return f"{activation} ({run_dir.name})"
    return run_dir.name


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with metrics.jsonl)")
    parser.add_argument("-o", "--output", type=Path, default=Path("runs.png"), help="PNG to write")
    parser.add_argument("--labels", nargs="*", help="legend labels, one per run")
    parser.add_argument(
        "--smooth", type=float, default=0.0, help="EMA factor for the training loss (e.g. 0.9)"
    )
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f"--labels has {len(args.labels)} entries for {len(args.runs)} runs")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for run in args.runs:
        try:
            runs.append(read_run(run))
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    most = max((r["tokens"] for train, _ in runs for r in train.values()), default=1)
    scale, unit = next((s, u) for s, u in ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")) if most >= s)

    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (run, (train, valid)) in enumerate(zip(args.runs, runs)):
        label = args.labels[i] if args.labels else label_for(run)
        steps = sorted(train)
        if steps:
            tokens = [train[s]["tokens"] / scale for s in steps]
            ax_loss.plot(tokens, ema([train[s]["loss"] for s in steps], args.smooth), label=label)
        vsteps = sorted(valid)
        if vsteps:
            ax_ppl.plot(
                [valid[s]["tokens"] / scale for s in vsteps],
                [valid[s]["val_ppl"] for s in vsteps],
                "o-",
                label=label,
            )
    for ax, title in ((ax_loss, "training loss"), (ax_ppl, "validation perplexity")):
        ax.set_xlabel(f"tokens ({unit})" if unit else "tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")
    labels = args.labels or [label_for(run) for run in args.runs]
    coefficients = plot_coefficients(args.runs, labels, args.output)
    if coefficients:
        print(f"wrote {coefficients}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
