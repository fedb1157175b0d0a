"""Preprocessing split over several tasks (a SLURM job array, run here through the sbatch example with
a stand-in `srun`): tasks in any order, one SIGKILLed and requeued, give the bytes of one machine."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dense_model.data.preprocess import PreprocessConfig, _claim_merge, preprocess
from dense_model.data.preprocess.claims import ClaimError
from tests.data.helpers import wait_for_done_shards

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "scripts" / "slurm" / "preprocess_array.sbatch"


def _stand_in_slurm(tmp_path: Path) -> dict:
    """PATH with `srun` (runs its command once, as on a one-node task) and `python` (this venv's)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ $1 == -* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
        SLURM_SUBMIT_DIR=str(REPO),
        SLURM_ARRAY_TASK_COUNT="3",
        SLURM_CPUS_PER_TASK="1",
    )
    return env


def _task(env: dict, index: int, args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(SBATCH), *args],
        env=dict(env, SLURM_ARRAY_TASK_ID=str(index)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def _share(out: str) -> int:
    return int(re.search(r"(\d+) shards for this task", out).group(1))


@pytest.mark.slow
def test_three_tasks_in_any_order_one_killed_and_requeued_equal_one_machine(
    tmp_path, spm_model, corpora, data_helpers
):
    root = str(Path(corpora[None]).parent)  # plain/, zst/ and gz/: three subsets
    reference = tmp_path / "ref" / "red"
    ref = preprocess(
        PreprocessConfig(
            inputs=[root],
            output_prefix=str(reference),
            tokenizer_type="sentencepiece",
            tokenizer_model=spm_model,
            append_eod=True,
            split_by_subset=True,
            shard_size_mb=0.01,
            progress=False,
        ),
        log=None,
    )
    assert len(ref.outputs) == 3

    env = _stand_in_slurm(tmp_path)
    prefix = tmp_path / "run" / "red"
    args = [root, str(prefix), spm_model, "--shard-size-mb", "0.01"]
    work = Path(str(prefix) + ".shards")

    slow = _task(env, 1, [*args, "--debug-batch-delay", "1"], start_new_session=True)
    wait_for_done_shards(slow, work, 2, timeout=300)
    os.killpg(slow.pid, signal.SIGKILL)  # the whole task: batch shell, srun, python and its workers
    first_out = slow.communicate()[0]
    assert len(list(work.glob("*.done.json"))) >= 2

    for index in (2, 0):
        out = _finish(_task(env, index, args))
        assert "the last task merges" in out, out
        assert not Path(ref.outputs[0].prefix.replace(str(reference), str(prefix)) + ".bin").exists()

    out = _finish(_task(env, 1, args))  # requeued: redoes only its unfinished shards, then merges
    assert _share(out) < _share(first_out)
    assert "published" in out
    for o in ref.outputs:
        merged = o.prefix.replace(str(reference), str(prefix))
        assert data_helpers.file_bytes(merged) == data_helpers.file_bytes(o.prefix), merged
    assert not work.exists(), "the merging task removes the work folder"


def test_only_one_task_claims_the_merge(tmp_path):
    def cfg(index, merge_only=False):
        return PreprocessConfig(
            inputs=[], output_prefix="x", tokenizer_type="", tokenizer_model="",
            task_index=index, num_tasks=3, merge_only=merge_only,
        )  # fmt: skip

    assert _claim_merge(str(tmp_path), cfg(2))
    assert not _claim_merge(str(tmp_path), cfg(0))
    assert not _claim_merge(str(tmp_path), cfg(1))
    assert _claim_merge(str(tmp_path), cfg(2)), "the claimant, requeued, takes its merge up again"
    with pytest.raises(
        ClaimError, match=r"the merge is claimed by task 2, pid \d+ on .*delete .*merge.claim"
    ):
        _claim_merge(str(tmp_path), cfg(0, merge_only=True))  # its claimant (this process) lives
    claim = tmp_path / "merge.claim"
    record = json.loads(claim.read_text())
    gone = _dead_pid()
    claim.write_text(json.dumps(dict(record, pid=gone)))
    assert _claim_merge(str(tmp_path), cfg(0, merge_only=True)), "--merge-only takes over a dead claimant's"
    assert json.loads(claim.read_text())["what"] == "merge-only"


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
