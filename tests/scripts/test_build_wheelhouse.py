"""scripts/build_wheelhouse.py --dry-run: the offline wheelhouse's package list keeps the machine's
torch, Triton, CUDA wheels and numpy, pins everything else at the versions installed here, and the
pip command targets the Python and platform asked for (no download in the test)."""

import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(*args):
    return subprocess.run(
        [sys.executable, "scripts/build_wheelhouse.py", *args], cwd=REPO, env=dict(os.environ),
        capture_output=True, text=True,
    )  # fmt: skip


def test_dry_run_lists_everything_but_the_machines_torch(tmp_path):
    proc = _run(
        "--dry-run", "--out", str(tmp_path), "--python-version", "3.12", "--platform", "manylinux_2_28_x86_64"
    )
    assert proc.returncode == 0, proc.stderr
    lines = [
        line for line in (tmp_path / "requirements-keep-torch.txt").read_text().splitlines() if "==" in line
    ]
    pins = dict(line.split("==") for line in lines)
    assert not [n for n in pins if n in ("torch", "triton", "numpy") or n.startswith(("nvidia-", "cuda-"))]
    for name in ("megatron-core", "lm-eval", "transformers", "pytest", "sentencepiece", "psutil"):
        assert pins[name] == md.version(name), name  # the versions installed (and tested) here
    assert "pyarrow" in pins and "packaging" in pins  # dependencies of dependencies too
    command = proc.stdout.splitlines()[-1]
    for flag in (
        "--only-binary=:all:",
        "--python-version 3.12",
        "--platform manylinux_2_28_x86_64",
        "--no-deps",
    ):
        assert flag in command, flag
    assert not list(tmp_path.glob("*.whl"))


def test_with_numpy_and_bad_python_version(tmp_path):
    proc = _run("--dry-run", "--out", str(tmp_path), "--with-numpy", "--no-dev")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "requirements-keep-torch.txt").read_text()
    assert f"numpy=={md.version('numpy')}" in text and "pytest==" not in text
    proc = _run("--dry-run", "--out", str(tmp_path), "--python-version", "311")
    assert proc.returncode == 2 and "--python-version" in proc.stderr
