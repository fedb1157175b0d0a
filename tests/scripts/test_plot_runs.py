"""scripts/plot_runs.py draws several runs' metrics.jsonl on one PNG."""

import json
import subprocess
import sys
from pathlib import Path

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
