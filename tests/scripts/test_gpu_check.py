"""scripts/gpu_check.sh --cpu: the GPU check's CPU parts run end to end and write their JSON and
Markdown summary (the demo against its CPU golden losses, kill + resume, lm-eval, the benchmarks)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_cpu_parts(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--cpu", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    blob = json.loads((out / "gpu_check.json").read_text())
    parts = blob["parts"]
    assert blob["ok"] and blob["meta"]["mode"] == "cpu"
    ran = {name for name, part in parts.items() if part["status"] == "ok"}
    assert ran == {"demo_fp32", "kill_resume", "lm_eval", "bench_act", "bench_step", "optim_step"}
    assert all(parts[name]["status"].startswith("skipped") for name in parts.keys() - ran)
    assert parts["demo_fp32"]["max_rel_diff_vs_cpu"] < 1e-4  # same machine type: the golden losses
    assert (
        parts["kill_resume"]["kill"] == "killed" and parts["kill_resume"]["max_loss_diff_steps_11_20"] < 1e-6
    )
    step = json.loads((out / "bench_train_step.json").read_text())["results"]
    assert {(r["activation"], r["fused"], r["attention"]) for r in step if r["status"] == "ok"} == {
        (act, fused, attention)
        for act, fused in (("swiglu", "na"), ("polynorm", "on"), ("polynorm", "off"))
        for attention in ("DotProductAttention", "SDPAttention")
    }
    assert json.loads((out / "bench_activations.json").read_text())["results"]
    optim = parts["optim_step"]  # megatron-core's fallback reads one value per gradient tensor
    assert optim["foreach_host_reads_per_optimizer_step"] < optim["megatron_host_reads_per_optimizer_step"]
    summary = (out / "gpu_check.md").read_text()
    assert "| kill_resume | ok |" in summary and "| kernels | skipped" in summary
