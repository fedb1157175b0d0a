"""The README's main job: `bash run_pretrain.sh` with no config runs the laptop demo end to end
(tokenizer training and tokenisation of the shipped RedPajama sample, then training on the CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Golden losses of the demo (logged means over 10 steps; validation), measured with torch 2.13.0+cpu and
# megatron-core 0.16.1 on the project's 2-core x86-64 machine, identical over repeated runs. They
# guard against silent drift (a dependency upgrade, a change of init, data order or loss masking).
GOLDEN_TRAIN = {10: 7.7168519, 50: 5.5120012, 100: 4.8251246, 150: 4.5540005}
GOLDEN_VALID = {50: 5.3132076, 100: 4.7737346, 150: 4.5592928}


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    from dense_model.testing import free_port

    run_dir = tmp_path / "demo"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "DENSE_MODEL_CACHE": str(tmp_path / "cache"),
        "MASTER_PORT": str(free_port()),
        # One OpenMP thread, as every other launch in the suite: under pytest-xdist each core has a
        # worker already, and a second thread per process only adds spin-waiting (on a busy 2-core
        # machine the default 2 threads spent 6 CPU minutes on the first 40 of the 150 steps).
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        ["bash", "run_pretrain.sh", f"run_dir={run_dir}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    valid = [r for r in records if "val_loss" in r]
    assert train[-1]["step"] == 150
    assert train[-1]["loss"] < train[0]["loss"] - 1.5, (train[0]["loss"], train[-1]["loss"])
    assert valid and valid[-1]["val_loss"] < valid[0]["val_loss"]
    by_step = {r["step"]: r["loss"] for r in train}
    for step, loss in GOLDEN_TRAIN.items():
        assert by_step[step] == pytest.approx(loss, rel=2e-3), (step, by_step[step], loss)
    val_by_step = {r["step"]: r["val_loss"] for r in valid}
    for step, loss in GOLDEN_VALID.items():
        assert val_by_step[step] == pytest.approx(loss, rel=2e-3), (step, val_by_step[step], loss)
    latest = (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text()
    assert latest == "150" and (run_dir / "checkpoints" / "iter_0000150" / "dense_model.json").is_file()
    assert f"checkpoint {run_dir / 'checkpoints'}" in out and "metrics.jsonl" in out
