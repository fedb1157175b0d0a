"""run_lm_eval.sh --every-checkpoint: every saved iteration of a tiny run trained in the test scored
once by real lm-eval in one Python (the local task tiny_python_mc, --limit 4), results equal to a
plain run_lm_eval.sh on that iteration, reruns skipping what is done; a SIGKILL mid-task keeps the
previous results and counts nothing torn, the rerun clears what it left; an iteration whose lock a
live process holds is skipped (never scored twice at once) while the others are scored; --slurm's
array script (one task run here by hand, through bash, as sbatch runs it).

The jobs run in workers forked from the test's fork server (``run_tool``: torch and megatron-core
imported once), except the array task, which is the real script."""

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from dense_model.config import parse_overrides
from dense_model.testing import offline_env, run_tool
from tests.training.conftest import tiny_overrides
from tests.training.pretrain_jobs import trained_ok

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "toolkits" / "evaluation" / "run_lm_eval.py"
TASK = "tiny_python_mc"
TASKS = "tasks"  # the fixture's folder of TASK, read from any working directory
EVAL = ["--include_path", TASKS, "--limit", "4"]
OTHER = [*EVAL[:2], "--limit", "2"]  # another --limit: every iteration unscored for it
GLOBAL_BATCH, SEQ = 8, 64  # tiny_overrides'


def every(path, root, *args):
    """``run_lm_eval.sh PATH TASK --every-checkpoint ARGS`` (the script the shell wrapper execs)."""
    return run_tool(TOOL, [path, TASK, "--every-checkpoint", *_tasks_in(root, args)], root)


def _tasks_in(root, args):
    return [str(root / a) if a == TASKS else a for a in args]


def results_of(folder: Path) -> dict:
    (path,) = folder.rglob("results*.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def run(tmp_path_factory, mmap_dataset, spm_model):
    """A study-like folder holding one tiny run with checkpoints at iterations 1, 2 and 3, and the
    example task TASK in ROOT/tasks with its data file's absolute path."""
    root = tmp_path_factory.mktemp("every")
    examples = REPO / "examples" / "lm_eval_tasks"
    (root / TASKS).mkdir()
    (root / TASKS / f"{TASK}.yaml").write_text(
        (examples / f"{TASK}.yaml").read_text().replace("examples/lm_eval_tasks/", f"{examples}/")
    )
    run_dir = root / "runs" / "tiny"
    overrides = tiny_overrides(run_dir, mmap_dataset, spm_model)
    overrides += [
        "training.train_iters=3",
        "checkpoint.save_interval=1",
        "checkpoint.keep_last=10",
        "training.lr_warmup_iters=1",
    ]
    overrides += ["logging.eval_interval=100", "logging.tensorboard=false"]
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(parse_overrides(overrides)))
    trained_ok(config)
    return root, run_dir


@pytest.mark.slow
def test_every_checkpoint_scores_each_once_like_a_plain_run(run):
    root, run_dir = run
    first = every(root, root, *EVAL)  # the study folder: its runs
    assert first.returncode == 0, first.stderr[-3000:]
    assert "3 scored, 0 skipped, 0 busy" in first.stdout
    for n in (1, 2, 3):
        data = results_of(run_dir / "lm_eval" / f"iter_{n:07d}")
        stamp = data["dense_model_every_checkpoint"]
        assert stamp == {
            "iteration": n,
            "tasks": [TASK],
            "num_fewshot": None,
            "limit": "4",
            "tokens": n * GLOBAL_BATCH * SEQ,
        }
        assert data["config"]["dense_model_iteration"] == n  # the x position scripts/plot_runs.py reads
        assert data["config"]["dense_model_tokens"] == n * GLOBAL_BATCH * SEQ
    assert sorted(p.name for p in (run_dir / "lm_eval").iterdir()) == [f"iter_{n:07d}" for n in (1, 2, 3)]

    plain = run_tool(
        TOOL,
        [
            run_dir / "checkpoints" / "iter_0000002",
            TASK,
            *_tasks_in(root, EVAL),
            "--output_path",
            root / "plain",
        ],
        root,
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert (
        results_of(root / "plain")["results"] == results_of(run_dir / "lm_eval" / "iter_0000002")["results"]
    )

    again = every(run_dir, root, *EVAL)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 scored, 3 skipped" in again.stdout
    assert again.stdout.count("already scored with these tasks, skipped") == 3

    unknown = run_tool(
        TOOL, [run_dir, f"{TASK},no_such_task", "--every-checkpoint", *_tasks_in(root, EVAL)], root
    )
    assert unknown.returncode == 2, unknown.stderr[-3000:]  # the same for every iteration: one line, stop
    assert (
        unknown.stderr.strip()
        .splitlines()[-1]
        .startswith("run_lm_eval: error: lm-eval does not know the task(s) no_such_task.")
    )
    assert sorted(p.name for p in (run_dir / "lm_eval").iterdir()) == [f"iter_{n:07d}" for n in (1, 2, 3)]


def _holder_pid(lock: Path, deadline: float) -> int:
    while time.monotonic() < deadline:
        try:
            return json.loads(lock.read_text())["pid"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.1)
    raise AssertionError(f"{lock} never appeared")


@pytest.mark.slow
def test_sigkill_keeps_the_old_results_and_a_held_iteration_is_never_scored_twice(run):
    from dense_model.fsreplace import target_lock

    root, run_dir = run
    out = run_dir / "lm_eval"
    before = {n: results_of(out / f"iter_{n:07d}") for n in (1, 2, 3)}

    # A job replacing iteration 1's results (another --limit) killed while lm-eval works.
    done = {}
    job = threading.Thread(target=lambda: done.update(proc=every(run_dir, root, *OTHER)))
    job.start()
    pid = None
    try:
        pid = _holder_pid(out / ".iter_0000001.lock", time.monotonic() + 60)
        time.sleep(0.5)  # lm-eval under way in the staging folder (its import alone takes seconds)
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        job.join()
    assert done["proc"].returncode == -signal.SIGKILL
    (staging,) = out.glob(".iter_0000001.tmp-*")
    assert (out / ".iter_0000001.lock").exists()  # left by the dead holder
    assert results_of(out / "iter_0000001") == before[1]  # the previous results, whole

    # The rerun, while a live process holds iteration 2 (as a second job scoring it would): 1 and 3
    # are scored (the dead holder's lock and staging cleared), 2 is left to its holder untouched.
    with target_lock(out / "iter_0000002", "another job", "results folder"):
        rerun = every(run_dir, root, *OTHER)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "2 scored, 0 skipped, 1 busy" in rerun.stdout
    assert (
        f"iter_0000002: being scored by another job (host {os.uname().nodename}, pid {os.getpid()}"
        in rerun.stdout
    )
    assert rerun.stdout.count("results of another task list or options replaced") == 2
    assert not staging.exists()
    assert sorted(p.name for p in out.iterdir()) == [
        f"iter_{n:07d}" for n in (1, 2, 3)
    ]  # no lock, no temporary
    for n, limit in ((1, "2"), (2, "4"), (3, "2")):
        assert results_of(out / f"iter_{n:07d}")["dense_model_every_checkpoint"]["limit"] == limit
    assert results_of(out / "iter_0000002") == before[2]


@pytest.mark.slow
def test_slurm_writes_one_array_task_per_unscored_iteration(run, tmp_path, monkeypatch):
    root, run_dir = run  # after the test above: iteration 2 alone is unscored with OTHER
    out = run_dir / "lm_eval"
    script = root / "lm_eval" / "lm_eval_every_checkpoint.sbatch"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    alone = every(root, root, "--slurm", *OTHER)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "1 iteration(s) to score (tiny:2)" in alone.stdout and "sbatch is not on PATH" in alone.stdout

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/sbatch_args\necho 4242\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    sub = every(root, root, "--slurm", *OTHER)
    assert sub.returncode == 0, sub.stderr[-3000:]
    assert "submitted array job 4242" in sub.stdout
    assert (tmp_path / "sbatch_args").read_text().split() == ["--parsable", "--array=0-0", str(script)]
    text = script.read_text()
    assert "#SBATCH --gpus-per-node=1" in text and "#SBATCH --nodes=1" in text
    assert f"RUNS=({run_dir})" in text and "ITERS=(2)" in text

    task = subprocess.run(
        ["bash", str(script)],
        env={**offline_env(root), "SLURM_ARRAY_TASK_ID": "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert task.returncode == 0, task.stderr[-3000:]
    assert "1 scored, 0 skipped" in task.stdout and "replaced" in task.stdout
    for n in (1, 2, 3):
        assert results_of(out / f"iter_{n:07d}")["dense_model_every_checkpoint"]["limit"] == "2"

    left = every(root, root, "--slurm", *OTHER)
    assert left.returncode == 0, left.stderr[-3000:]
    assert "every saved iteration is scored already; nothing to submit" in left.stdout


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
