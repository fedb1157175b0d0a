"""Shared helpers of the data tests."""

import os
import subprocess
import sys
import time
from pathlib import Path

from dense_model.data.preprocess import PreprocessConfig

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / "toolkits" / "pretrain_data_preprocessing" / "preprocess_data.py"


def preprocess_config(spm_model, prefix, inputs=(), **kw) -> PreprocessConfig:
    """A PreprocessConfig for the session's SentencePiece model: EOD appended, no progress bar."""
    base = dict(
        inputs=list(inputs),
        output_prefix=str(prefix),
        tokenizer_type="sentencepiece",
        tokenizer_model=spm_model,
        append_eod=True,
        progress=False,
    )
    base.update(kw)
    return PreprocessConfig(**base)


def wait_for_done_shards(proc: subprocess.Popen, work: Path, count: int, timeout: float = 300) -> None:
    """Wait until ``count`` shards of the work folder ``work`` are done while ``proc`` still runs
    (to kill it mid-run); fails if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if work.is_dir() and len(list(work.glob("*.done.json"))) >= count:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.communicate()[0]}"


def run_cli(args: list[str], env_extra: dict | None = None, **kw) -> subprocess.Popen:
    """The user's command, preprocess_data.py ARGS, started with its output captured (merged)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    return subprocess.Popen(
        [sys.executable, str(CLI), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def wait_for(proc: subprocess.Popen, found, what: str, timeout: float = 300) -> None:
    """Wait until ``found()`` is true while ``proc`` still runs; fails if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not found():
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before {what}:\n{proc.communicate()[0]}"
    assert found(), f"no {what} within {timeout} s"
