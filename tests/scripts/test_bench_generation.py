"""scripts/bench_generation.py runs end to end (small sizes) and finds both methods' text equal."""

import os
from pathlib import Path

from dense_model.testing import run_tool

REPO = Path(__file__).resolve().parents[2]


def test_bench_generation_smoke(tmp_path):
    # Forked from the fork server (torch and megatron-core imported): the script, not its start, is tested.
    proc = run_tool(
        REPO / "scripts/bench_generation.py",
        ["--seq", "64", "--new", "6", "--requests", "3", "--batch", "2",
         "model.num_layers=1", "model.hidden_size=64", "model.swiglu_ffn_hidden_size=96"],
        None, timeout=300, env={**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "same text from both: True" in proc.stdout
    assert "| cached |" in proc.stdout and "| recompute |" in proc.stdout
