"""run_lm_eval.sh --every-checkpoint: every saved iteration of a tiny run trained in the test scored
once by real lm-eval (the local task tiny_python_mc, --limit 4), results equal to a plain
run_lm_eval.sh on that iteration, reruns skipping what is done, a SIGKILL mid-task leaving nothing
that counts, and --slurm's array script (one task run here by hand)."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from dense_model.config import parse_overrides
from dense_model.testing import offline_env
from tests.training.conftest import tiny_overrides
from tests.training.pretrain_jobs import trained_ok

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "toolkits" / "evaluation" / "run_lm_eval.sh"
TASK = "tiny_python_mc"
EVAL = ["--include_path", "examples/lm_eval_tasks", "--limit", "4"]
GLOBAL_BATCH, SEQ = 8, 64  # tiny_overrides'


def cli(args, out, env=None, **kw):
    return subprocess.run(
        ["bash", str(RUNNER), *map(str, args)],
        cwd=REPO,  # the task's data_files are relative to the repository root
        env={**offline_env(out), **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


def results_of(folder: Path) -> dict:
    (path,) = folder.rglob("results*.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def run(tmp_path_factory, mmap_dataset, spm_model):
    """A study-like folder holding one tiny run with checkpoints at iterations 1 and 2."""
    root = tmp_path_factory.mktemp("every")
    run_dir = root / "runs" / "tiny"
    overrides = tiny_overrides(run_dir, mmap_dataset, spm_model)
    overrides += [
        "training.train_iters=2",
        "checkpoint.save_interval=1",
        "checkpoint.keep_last=10",
        "training.lr_warmup_iters=1",
    ]
    overrides += ["logging.eval_interval=100", "logging.tensorboard=false"]
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(parse_overrides(overrides)))
    trained_ok(config)
    return root, run_dir, config


@pytest.mark.slow
def test_every_checkpoint_scores_each_once_like_a_plain_run(run):
    root, run_dir, _ = run
    first = cli([run_dir, TASK, "--every-checkpoint", *EVAL], root)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 scored, 0 skipped" in first.stdout
    for n in (1, 2):
        data = results_of(run_dir / "lm_eval" / f"iter_{n:07d}")
        stamp = data["dense_model_every_checkpoint"]
        assert stamp == {
            "iteration": n,
            "tasks": [TASK],
            "num_fewshot": None,
            "limit": "4",
            "tokens": n * 8 * 64,
        }
        assert data["config"]["dense_model_iteration"] == n  # the x position scripts/plot_runs.py reads
        assert data["config"]["dense_model_tokens"] == n * GLOBAL_BATCH * SEQ
    assert not list((run_dir / "lm_eval").glob(".iter_*"))

    plain = cli(
        [run_dir / "checkpoints" / "iter_0000001", TASK, *EVAL, "--output_path", root / "plain"], root
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert (
        results_of(root / "plain")["results"] == results_of(run_dir / "lm_eval" / "iter_0000001")["results"]
    )

    again = cli([run_dir, TASK, "--every-checkpoint", *EVAL], root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 scored, 2 skipped" in again.stdout
    assert again.stdout.count("already scored with these tasks, skipped") == 2


@pytest.mark.slow
def test_sigkill_mid_task_leaves_nothing_counted_and_rerun_scores_the_new_iteration(run):
    root, run_dir, config = run
    trained_ok(config, "training.train_iters=3")  # resumes: a newly saved iteration 3
    out = run_dir / "lm_eval"
    proc = subprocess.Popen(
        ["bash", str(RUNNER), str(root), TASK, "--every-checkpoint", *EVAL],  # the study folder: its runs
        cwd=REPO,
        env=offline_env(root),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob(".iter_0000003.tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # lm-eval under way in the temporary folder
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    (dead,) = out.glob(".iter_0000003.tmp-*")
    assert not (out / "iter_0000003").exists()

    rerun = cli([root, TASK, "--every-checkpoint", *EVAL], root)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "1 scored, 2 skipped" in rerun.stdout and f"removing {dead}" in rerun.stdout
    assert not dead.exists()
    assert results_of(out / "iter_0000003")["dense_model_every_checkpoint"]["iteration"] == 3


@pytest.mark.slow
def test_slurm_writes_one_array_task_per_unscored_iteration(run, tmp_path):
    root, run_dir, config = run
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/sbatch_args\necho 4242\n')
    (bin_dir / "sbatch").chmod(0o755)
    other = [*EVAL[:2], "--limit", "2"]  # another --limit: every iteration unscored for it
    out = run_dir / "lm_eval"
    sub = cli(
        [root, TASK, "--every-checkpoint", "--slurm", *other],
        root,
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )
    assert sub.returncode == 0, sub.stderr[-3000:]
    script = root / "lm_eval" / "lm_eval_every_checkpoint.sbatch"
    assert "submitted array job 4242" in sub.stdout
    assert (tmp_path / "sbatch_args").read_text().split() == ["--parsable", "--array=0-2", str(script)]
    text = script.read_text()
    assert "#SBATCH --gpus-per-node=1" in text and "#SBATCH --nodes=1" in text
    assert f"RUNS=({run_dir} {run_dir} {run_dir})" in text and "ITERS=(1 2 3)" in text

    task = subprocess.run(
        ["bash", str(script)],
        env={**offline_env(root), "SLURM_ARRAY_TASK_ID": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert task.returncode == 0, task.stderr[-3000:]
    assert "1 scored, 0 skipped" in task.stdout and "replaced" in task.stdout
    assert results_of(out / "iter_0000002")["dense_model_every_checkpoint"]["limit"] == "2"
    assert results_of(out / "iter_0000001")["dense_model_every_checkpoint"]["limit"] == "4"

    left = cli([root, TASK, "--every-checkpoint", "--slurm", *other], root, env={"PATH": "/usr/bin:/bin"})
    assert left.returncode == 0, left.stderr[-3000:]
    assert (
        "2 iteration(s) to score (tiny:1, tiny:3)" in left.stdout and "sbatch is not on PATH" in left.stdout
    )
    assert "ITERS=(1 3)" in script.read_text()


def test_bad_input_is_one_line(tmp_path, capsys):
    from dense_model.evaluation.run import main

    assert main([str(tmp_path / "nope"), TASK, "--every-checkpoint"]) == 2
    assert "does not exist: give a run directory or a study directory" in capsys.readouterr().err
    assert main([str(tmp_path), TASK, "--every-checkpoint"]) == 2
    assert f"{tmp_path} holds no checkpoints/ folder" in capsys.readouterr().err
    (tmp_path / "checkpoints").mkdir()
    assert main([str(tmp_path), TASK, "--every-checkpoint", "--output_path", "x"]) == 2
    err = capsys.readouterr().err
    assert "--output_path" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "lm_eval").exists()
