"""The GPU benchmark scripts stay runnable: CPU smoke runs (tiny shapes, nothing timed).

``scripts/kernel_errors.py --device cpu`` writes the kernel error table; ``scripts/bench_activations.py --device cpu`` runs every variant's forward and backward through the
Triton interpreter and the parity check; ``scripts/bench_train_step.py --device cpu`` trains a tiny
model a step per run through megatron-core on the CPU. On a GPU machine both scripts are meant to
be run by hand (see docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[3] / "scripts"


def run_script(name: str, *args: str, interpret: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args], env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:  # the whole output in the report (the GPU check keeps pytest's log)
        print(f"{name} exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}", file=sys.stderr)
    return proc


def test_bench_activations_cpu_smoke(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "act.json"
    proc = run_script(
        "bench_activations.py", "--device", "cpu", "--sweep", "--json", str(out), interpret=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| polynorm | fused |" in proc.stdout and "| swiglu | torch |" in proc.stdout
    blob = json.loads(out.read_text())
    variants = {(r["activation"], r["variant"]) for r in blob["results"]}
    assert {
        ("polynorm", "fused"),
        ("polynorm", "torch"),
        ("polynorm", "paper-ckpt"),
        ("polyrelu", "fused"),
    } <= variants
    for activation, errors in blob["checks"].items():  # bf16 outputs: within a bf16 rounding
        assert max(errors.values()) < 1e-2, (activation, errors)
    saved = {(r["activation"], r["variant"]): r["saved_bytes_per_token"] for r in blob["results"]}
    # Fused PolyNorm keeps only x (not counted) and 3 fp32 inverse RMS per token (+ the 16 bytes of
    # scalars over 8 rows); the torch reference keeps fp32 powers of the whole row.
    assert saved[("polynorm", "fused")] < 16 < saved[("polynorm", "torch")]
    assert saved[("polyrelu", "fused")] < 4 < saved[("polyrelu", "torch")]
    # The sweep ran one launch configuration per width through the interpreter (nothing timed).
    swept = {(r["activation"], r["width"]): r for r in blob["sweep"]}
    assert set(swept) == {(a, w) for a in ("polynorm", "polyrelu") for w in (40, 77)}
    assert all(len(r["configs"]) == 1 and r["best"] is None for r in swept.values())
    assert "| polynorm | 77 | 1 |" in proc.stdout


def test_kernel_error_table_cpu(tmp_path):
    """The script behind docs/benchmarks.md's error table: every worst error within the tests' fp32 budget."""
    pytest.importorskip("triton")
    out = tmp_path / "errors.json"
    proc = run_script(
        "kernel_errors.py", "--device", "cpu", "--dtypes", "fp32", "--json", str(out), interpret=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| input | y | dx | d weight | d bias |" in proc.stdout and "| fp32 |" in proc.stdout
    errors = json.loads(out.read_text())["errors"]["fp32"]
    assert set(errors) == {"y", "dx", "d_weight", "d_bias"}
    assert 0 < max(errors.values()) < 1e-5, (
        errors
    )  # not all zero: the kernels and the reference differ in rounding


def test_bench_scripts_refuse_cuda_without_a_gpu():
    for name in ("bench_activations.py", "bench_train_step.py", "kernel_errors.py"):
        proc = run_script(name)
        assert proc.returncode == 2 and "no CUDA device" in proc.stderr, proc.stderr[-2000:]


def test_bench_train_step_help():
    proc = run_script("bench_train_step.py", "--help")
    assert proc.returncode == 0 and "--runs" in proc.stdout


@pytest.mark.slow
def test_bench_train_step_cpu_smoke(tmp_path):
    pytest.importorskip("megatron.core")
    try:
        import dense_model.model  # noqa: F401
        from dense_model.config import load_config  # noqa: F401
    except ImportError as err:
        pytest.skip(f"model builder not available yet: {err}")
    out = tmp_path / "step.json"
    proc = run_script(
        "bench_train_step.py",
        "--device",
        "cpu",
        "--warmup",
        "1",
        "--steps",
        "3",
        "--dp-size",
        "8",
        "--runs",
        "swiglu:na,polynorm:on",
        "--json",
        str(out),
        "model.num_layers=1",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    blob = json.loads(out.read_text())
    results = blob["results"]
    assert [(r["activation"], r["fused"], r["status"]) for r in results] == [
        ("swiglu", "na", "ok"),
        ("polynorm", "on", "ok"),
    ]
    meta = blob["meta"]
    assert meta["schedule"] == [0, 1, 0, 1, 0, 1]  # interleaved: A B A B A B after the warm-up
    assert meta["timer"] == "perf_counter" and meta["dp_size"] == 8
    for r in results:
        st, opt, dp = r["step_ms"], r["optimizer_ms"], r["step_ms_dp"]
        assert st["n"] == 3 and len(r["step_ms_all"]) == 3
        assert st["min"] <= st["q1"] <= st["median"] <= st["q3"] and st["iqr"] == st["q3"] - st["q1"]
        assert 0 < opt["median"] < st["median"]
        # Per step: the step less 7/8 of its optimizer part (the optimizer's share over DP = 8).
        shared = [s - o * 7 / 8 for s, o in zip(r["step_ms_all"], r["optimizer_ms_all"], strict=True)]
        assert dp["median"] == pytest.approx(statistics.median(shared)) and dp["median"] < st["median"]
    assert "step ms min / median / IQR" in proc.stdout and "interleaved in one process" in proc.stdout
