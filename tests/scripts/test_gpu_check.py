"""scripts/gpu_check.sh --cpu: the GPU check's CPU parts run end to end and write their JSON and
Markdown summary (the demo against its CPU golden losses, kill + resume, lm-eval, the benchmarks);
a part over its time cap is killed and recorded, and a check cut off mid-way keeps its JSON."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))  # gpu_check's part names


@pytest.mark.slow
def test_gpu_check_cpu_parts(tmp_path):
    """Every part but bench_act: its --cpu command (bench_activations.py --device cpu --sweep --json)
    is the one tests/activations/kernels/test_polycom_bench_scripts.py::test_bench_activations_cpu_smoke
    runs and checks; here it would only cost ~10 s of CPU again."""
    from gpu_check import CAPS

    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    wanted = ",".join(name for name in CAPS if name != "bench_act")
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--cpu", "--out", str(out), "--budget", "7200", "--parts", wanted],
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
    assert ran == {"env", "demo_fp32", "kill_resume", "lm_eval", "bench_step", "optim_step"}
    assert blob["finished"] and list(parts)[:3] == ["env", "kernels", "bench_step"]  # in order of value
    assert list(parts) == [name for name in CAPS if name != "bench_act"]
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
    assert not (out / "bench_activations.json").exists()  # not wanted: not run
    optim = parts["optim_step"]  # megatron-core's fallback reads one value per gradient tensor
    assert optim["foreach_host_reads_per_optimizer_step"] < optim["megatron_host_reads_per_optimizer_step"]
    summary = (out / "gpu_check.md").read_text()
    assert "| kill_resume | ok |" in summary and "| kernels | skipped" in summary


ENV = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def _check(out, *args):
    return ["bash", "scripts/gpu_check.sh", "--cpu", "--out", str(out), *args]


def test_a_part_over_its_cap_is_killed_and_the_rest_still_runs(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(
        _check(out, "--parts", "env,demo_fp32,lm_eval", "--cap", "demo_fp32=1"),
        cwd=REPO, env=ENV, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    blob = json.loads((out / "gpu_check.json").read_text())
    parts = blob["parts"]
    assert list(parts) == ["env", "demo_fp32", "lm_eval"] and blob["finished"] and not blob["ok"]
    assert parts["env"]["status"] == "ok" and parts["env"]["torch"].startswith("2.")
    assert parts["demo_fp32"]["status"] == "timeout (cap 1 s)"
    assert parts["lm_eval"]["status"] == "skipped: needs demo_fp32's checkpoint"
    assert not list((out / "runs" / "fp32").glob("checkpoints/iter_*"))  # killed before its first save


def test_a_check_cut_off_midway_keeps_the_parts_that_ran(tmp_path):
    """SIGKILL the whole check while its second part runs: the JSON names the first part's result
    and the part that was running; the Markdown says it did not finish."""
    from dense_model.procutil import kill_process_tree

    out = tmp_path / "check"
    proc = subprocess.Popen(
        _check(out, "--parts", "env,demo_fp32"), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    state = {}
    try:
        for _ in range(1200):  # until demo_fp32 has started (at most ~10 minutes)
            if (out / "gpu_check.json").exists():
                try:
                    state = json.loads((out / "gpu_check.json").read_text())["parts"]
                except json.JSONDecodeError:  # caught mid-write
                    state = {}
                if state.get("demo_fp32", {}).get("status") == "running":
                    break
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    finally:
        kill_process_tree(proc.pid)
        proc.wait()
    blob = json.loads((out / "gpu_check.json").read_text())
    assert blob["parts"]["env"]["status"] == "ok"
    assert blob["parts"]["demo_fp32"]["status"] == "running" and not blob["finished"]
    assert "**Not finished**" in (out / "gpu_check.md").read_text()


def test_bad_cap_and_part_names_are_refused(tmp_path):
    for args in (["--cap", "demo=5"], ["--cap", "demo_fp32=soon"], ["--parts", "env,nope"]):
        proc = subprocess.run(_check(tmp_path, *args), cwd=REPO, env=ENV, capture_output=True, text=True)
        assert proc.returncode == 2 and "gpu_check: --" in proc.stderr, (args, proc.stderr)
