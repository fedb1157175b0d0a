"""scripts/bench_moe_experts.py: the one-layer benchmark runs on the CPU (small sizes) with both
expert implementations; without a GPU the default (GPU) run stops with status 2 and one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

from dense_model.testing import run_tool

REPO = Path(__file__).resolve().parents[2]


def _run(*args, tmp_path, env=None):
    return subprocess.run(
        [sys.executable, "scripts/bench_moe_experts.py", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1", **(env or {})},
    )  # fmt: skip


def test_layer_benchmark_runs_both_implementations_on_cpu(tmp_path):
    # Forked from the fork server (torch and megatron-core imported): the benchmark, not its start, is
    # tested. The run without a GPU below stays a fresh Python: CUDA_VISIBLE_DEVICES acts at torch's start.
    out = tmp_path / "layer.json"
    proc = run_tool(
        REPO / "scripts/bench_moe_experts.py",
        ["layer", "--device", "cpu", "--config", REPO / "configs/moe/demo.yaml", "--seq", "32", "--mbs", "1",
         "--warmup", "1", "--iters", "1", "--json", out, "model.hidden_size=64"],
        None, env={**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert {k: v["experts"] for k, v in results.items()} == {
        "grouped": "GroupedExperts",
        "sequential": "SequentialMLP",
    }
    assert all(v["tokens_per_sec"] > 0 for v in results.values())
    assert "8 experts, top-2, hidden 64" in proc.stdout


def test_gpu_layer_run_without_gpu_exits_2(tmp_path):
    proc = _run("layer", tmp_path=tmp_path, env={"CUDA_VISIBLE_DEVICES": ""})  # no GPU, even on a GPU machine
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
