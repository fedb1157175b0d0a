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
from tests.data.helpers import run_cli, wait_for_done_shards

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


# An array of 2 tasks as SLURM describes it to each of them (SLURM_ARRAY_TASK_ID added per task).
ARRAY_OF_TWO = {"SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0"}


def _cli(args: list[str], env: dict) -> tuple[int, str]:
    proc = run_cli(args, env_extra=env)
    out = proc.communicate(timeout=300)[0]
    return proc.returncode, out


def _cli_args(root: str, spm_model: str, prefix: Path, *extra: str) -> list[str]:
    return [
        "--input", root, "--output-prefix", str(prefix), "--tokenizer-type", "sentencepiece",
        "--tokenizer-model", spm_model, "--append-eod", "--workers", "1", "--no-progress", *extra,
    ]  # fmt: skip


def _documents(prefix: Path) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return len(IndexedDataset(f"{prefix}_text_document"))


def test_an_array_of_one_task_per_dataset_tokenises_all_of_each(tmp_path, spm_model, corpora, texts):
    """Array task 1 of 2 preprocesses its own dataset (its own --output-prefix; task 0 another one),
    without --slurm-array: the array's variables must not cut the dataset into halves nobody merges."""
    prefix = tmp_path / "dataset1"
    code, out = _cli(_cli_args(corpora[None], spm_model, prefix), dict(ARRAY_OF_TWO, SLURM_ARRAY_TASK_ID="1"))
    assert code == 0, out
    assert "note: this SLURM array task tokenises all of its input" in out, out
    assert _documents(prefix) == len(texts), out
    assert not Path(f"{prefix}.shards").exists()


def test_an_array_task_that_no_other_task_joined_exits_non_zero_keeping_its_shards(
    tmp_path, spm_model, corpora, texts
):
    prefix = tmp_path / "red"
    args = _cli_args(corpora[None], spm_model, prefix, "--slurm-array", "--shard-size-mb", "0.01")
    code, out = _cli(args, dict(ARRAY_OF_TWO, SLURM_ARRAY_TASK_ID="0"))
    assert code == 1, out
    error = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "no other task of this run has registered" in error[0], out
    assert "nothing is merged" in error[0] and "--task-index" in error[0], out
    assert not list(tmp_path.glob("red_*.bin")) and list(Path(f"{prefix}.shards").glob("*.done.json"))
    code, out = _cli(args, dict(ARRAY_OF_TWO, SLURM_ARRAY_TASK_ID="1"))  # the partner comes: it merges
    assert code == 0 and "published" in out, out
    assert _documents(prefix) == len(texts)


@pytest.mark.parametrize(
    "env, message",
    [
        ({}, "SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT unset"),
        (dict(ARRAY_OF_TWO, SLURM_ARRAY_TASK_ID="3"), "array task 3 is not one of 2 evenly spaced tasks"),
        (dict(ARRAY_OF_TWO, SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_TASK_MIN="1", SLURM_ARRAY_TASK_STEP="4",
              SLURM_ARRAY_TASK_COUNT="3"), None),  # --array=1-9:4 is tasks 0..2: no error (checked below)
    ],
)  # fmt: skip
def test_slurm_array_without_usable_array_variables_is_one_line_exit_2(tmp_path, env, message):
    from dense_model.data.preprocess.cli import array_task, parse_args

    args = ["--input", str(tmp_path), "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "x",
            "--tokenizer-model", "x", "--slurm-array"]  # fmt: skip
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    if message is None:
        assert array_task(parse_args(args), dict(clean, **env)) == (0, 3)
        return
    proc = subprocess.run(
        [sys.executable, str(REPO / "toolkits" / "pretrain_data_preprocessing" / "preprocess_data.py"), *args],
        env=dict(clean, PYTHONPATH=str(REPO), **env), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --slurm-array: ") and message in lines[0], (
        proc.stderr
    )
    assert list(tmp_path.iterdir()) == [], "nothing is written"
