"""Fused PolyCom at TP=2 over gloo (two real processes) against TP=1 and the torch reference.

Under TP the FFN dimension is split; PolyNorm's per-row sums of squares (forward) and the per-row
moments of the gradient (backward) are all-reduced between a statistics kernel and an apply kernel,
and the scalars' gradients are the TP-group totals on every rank. The ranks run
``_polycom_tp_worker.py`` (as a module of the tests package) with the Triton interpreter on the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dense_model.testing import free_port

REPO = Path(__file__).resolve().parents[3]
WORKER = "tests.activations.kernels._polycom_tp_worker"


@pytest.mark.slow
def test_tp2_fused_matches_tp1_and_reference():
    pytest.importorskip("triton")
    world = 2
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world))
    env["TRITON_INTERPRET"] = "1"  # CPU tensors over gloo, on any machine
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))  # tests.*
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", WORKER],
            env=dict(env, RANK=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            outputs.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (code, out, err) in enumerate(outputs):
        if code != 0:  # the whole output in the report (the GPU check keeps pytest's log)
            print(f"rank {rank} exit {code}\n{out}\n{err}", file=sys.stderr)
    for rank, (code, out, err) in enumerate(outputs):
        assert code == 0, f"rank {rank} failed:\n{out}\n{err[-4000:]}"
        assert "12 TP=2 cases match" in out, out
