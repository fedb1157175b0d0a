"""scripts/check_reproducible.py: bad arguments are refused before anything runs or is written, and
its comparison of two runs' metrics.jsonl (written and read back) is bit for bit: a grad norm one ulp
apart is a difference. The runs themselves (minutes each) are measured in docs/benchmarks.md."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location(
        "check_reproducible", REPO / "scripts/check_reproducible.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(folder: Path, grad_norm_at_3: float) -> Path:
    folder.mkdir()
    records = []
    for step in range(1, 5):
        grad_norm = grad_norm_at_3 if step == 3 else 1.0 / step
        records.append({"step": step, "loss": 8.0 - step / 7, "grad_norm": grad_norm, "lr": 1e-3})
        records.append({"step": step, "activation_stats": {"layer0/in_rms": 0.3}})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_a_one_ulp_difference_is_found(tmp_path):
    script = _script()
    norm = 1.0368951551100694
    a = script.read_steps(_run(tmp_path / "a", norm))
    assert script.first_difference(a, script.read_steps(_run(tmp_path / "b", norm))) is None
    diff = script.first_difference(a, script.read_steps(_run(tmp_path / "c", math.nextafter(norm, 2.0))))
    assert diff is not None and diff.startswith("step 3: grad_norm"), diff


def test_bad_arguments_exit_2_before_anything_runs(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    for args, says in (
        (["--runs", "1", "--dir", str(tmp_path / "new")], "--runs 1"),
        (["--dir", str(busy)], f"--dir {busy} is not empty"),
        (["--config", str(tmp_path / "nope.yaml"), "--dir", str(tmp_path / "new")], "nope.yaml not found"),
        (["--env", "OMP_NUM_THREADS", "--dir", str(tmp_path / "new")], "--env 'OMP_NUM_THREADS'"),
    ):
        proc = subprocess.run(
            [sys.executable, "scripts/check_reproducible.py", *args], cwd=REPO, capture_output=True, text=True
        )
        assert proc.returncode == 2, proc.stderr
        assert says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (tmp_path / "new").exists()
