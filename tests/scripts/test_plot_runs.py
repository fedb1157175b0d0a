"""scripts/plot_runs.py draws several runs' metrics.jsonl on one PNG."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def write_run(path: Path, activation: str, offset: float):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"model:\n  activation: {activation}\n")
    lines = []
    for step in range(1, 41):
        lines.append({"step": step, "tokens": step * 4096, "loss": 6 - step * 0.05 + offset, "lr": 1e-3})
        if step % 10 == 0:
            lines.append(
                {"step": step, "tokens": step * 4096, "val_loss": 5.5 - step * 0.04, "val_ppl": 100.0 - step}
            )
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\nnot json\n")


def test_plot_runs_writes_a_png(tmp_path):
    write_run(tmp_path / "a", "swiglu", 0.0)
    write_run(tmp_path / "b", "polynorm", -0.1)
    out = tmp_path / "plot.png"
    proc = subprocess.run(
        [sys.executable, "scripts/plot_runs.py", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert "not JSON, skipped" in proc.stderr


def test_plot_runs_names_a_missing_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/plot_runs.py", str(tmp_path / "nope")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "nope/metrics.jsonl does not exist" in proc.stderr


def write_seed(path: Path, activation: str, seed: int):
    """A study run's folder: metrics.jsonl with training loss, the blend's validation and a named set
    (valid/c4/ppl), and an lm-eval results file under lm_eval/ at the last step."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"model:\n  activation: {activation}\ntraining:\n  seed: {seed}\n")
    shift = (0.1 if activation == "swiglu" else 0.0) + 0.01 * seed
    lines = []
    for step in range(1, 21):
        lines.append({"step": step, "tokens": step * 1_000_000_000, "loss": 6 - 0.1 * step + shift})
        if step % 10 == 0:
            lines.append(
                {"step": step, "tokens": step * 1_000_000_000, "val_loss": 5.0, "val_ppl": 50.0 + seed}
            )
            lines.append(
                {
                    "step": step,
                    "tokens": step * 1_000_000_000,
                    "valid/c4/loss": 4.0,
                    "valid/c4/ppl": 40.0 + shift,
                }
            )
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    results = {
        "results": {
            "hellaswag": {"acc,none": 0.3, "acc_norm,none": 0.30 + shift, "acc_norm_stderr,none": 0.01}
        },
        "config": {"dense_model_iteration": 20, "dense_model_activation": activation},
    }
    (path / "lm_eval/model").mkdir(parents=True)
    (path / "lm_eval/model/results_2026-12-06T00-00-00.json").write_text(json.dumps(results))


def test_a_study_is_one_band_per_activation_on_every_panel_png_and_svg(tmp_path):
    """2 activations x 3 seeds: each panel (training loss, the blend's validation and c4 perplexity,
    hellaswag accuracy) has one mean line and one band per activation, the band the seeds' min..max
    or the mean's 95% interval; main writes the PNG and the SVG."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.collections import PolyCollection
    from scipy.stats import t as student_t

    sys.path.insert(0, str(REPO / "scripts"))
    import plot_runs

    runs = []
    for activation in ("polynorm", "swiglu"):
        for seed in (1, 2, 3):
            write_seed(tmp_path / f"{activation}_s{seed}", activation, seed)
            runs.append(tmp_path / f"{activation}_s{seed}")
    loaded = []
    for run in runs:
        train, _ = plot_runs.read_run(run)
        loaded.append(
            {
                "label": plot_runs.activation_of(run),
                "train": train,
                "sets": plot_runs.read_named_sets(run),
                "downstream": plot_runs.read_downstream(run, train),
            }
        )
    for kind in ("minmax", "ci95"):
        fig, drawn = plot_runs.plot_panels(loaded, kind)
        assert list(drawn) == [
            "training loss",
            "validation perplexity",
            "c4 perplexity",
            "hellaswag/acc_norm",
        ]
        for ax, title in zip(fig.axes, drawn):
            bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
            assert len(bands) == 2, (kind, title)  # one per activation, not one per run
            assert set(drawn[title]) == {"polynorm", "swiglu"}
            assert {id(d["band"]) for d in drawn[title].values()} == {id(b) for b in bands}
        # training loss at 20 B tokens: the seeds' values 4 + shift, shift = 0.01 * seed (+0.1 swiglu)
        seeds = [4.0 + 0.1 + 0.01 * s for s in (1, 2, 3)]
        mean = sum(seeds) / 3
        swiglu = drawn["training loss"]["swiglu"]
        assert swiglu["line"].get_xdata()[-1] == 20.0  # tokens in B
        assert swiglu["line"].get_ydata()[-1] == pytest.approx(mean)
        if kind == "minmax":
            low, high = min(seeds), max(seeds)
        else:
            sd = math.sqrt(sum((v - mean) ** 2 for v in seeds) / 2)
            half = float(student_t.ppf(0.975, 2)) * sd / math.sqrt(3)
            low, high = mean - half, mean + half
        verts = swiglu["band"].get_paths()[0].vertices
        at_end = sorted(y for x, y in verts if x == 20.0)
        assert at_end[0] == pytest.approx(low) and at_end[-1] == pytest.approx(high)
        matplotlib.pyplot.close(fig)

    out = tmp_path / "out/study.png"
    assert plot_runs.main([*map(str, runs), "--band", "ci95", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.with_suffix(".svg").read_text().lstrip().startswith("<?xml")
