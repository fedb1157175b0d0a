"""Launching training as real processes (run_pretrain.sh -> torchrun -> workers) and reading
what they wrote. A module of its own (not conftest.py) so test files import it unambiguously."""

from pathlib import Path

from dense_model.procutil import kill_process_tree

REPO = Path(__file__).resolve().parents[2]


def launch(config, *overrides, nproc=1, env=None):
    """Start `bash run_pretrain.sh CONFIG overrides` (torchrun, nproc gloo processes) -> Popen.
    The launcher gets a process group of its own (as a login shell or a batch script has)."""
    import os
    import subprocess
    import sys

    from dense_model.testing import free_port

    full_env = {
        **os.environ,
        "PYTHON": sys.executable,
        "GPUS_PER_NODE": str(nproc),
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }
    full_env.update(env or {})
    return subprocess.Popen(
        ["bash", str(REPO / "run_pretrain.sh"), str(config), *overrides],
        cwd=REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def kill_job(proc):
    """SIGKILL the launcher, torchrun and every worker (a crashed node)."""
    kill_process_tree(proc.pid)
    proc.wait()


def job_processes(proc):
    """Every process the launcher started: torchrun, its workers (in sessions of their own) and
    the workers' helpers (data loader workers, dist_checkpointing's spawned Manager)."""
    import psutil

    return psutil.Process(proc.pid).children(recursive=True)


def finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def read_metrics(run_dir):
    """(train losses by step, validation losses by step): the last record of each step wins."""
    import json

    train, valid = {}, {}
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                train[r["step"]] = r["loss"]
            if "val_loss" in r:
                valid[r["step"]] = r["val_loss"]
    return train, valid


def _train_job(rank, world_size, config, overrides, out_dir, trainer):
    """One rank of train_in_workers: pretrain.main with its output captured; the exit code and the
    output written to OUT_DIR/rankR.txt."""
    import contextlib
    import io

    from dense_model.training import pretrain

    if trainer is not None:
        pretrain.Trainer = trainer(pretrain.Trainer)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = pretrain.main([str(config), *overrides])
    (Path(out_dir) / f"rank{rank}.txt").write_text(f"{code}\n{out.getvalue()}")


def train_in_workers(config, *overrides, nproc=1, trainer=None):
    """The trainer's own entry point (pretrain.main) on ``nproc`` gloo ranks in worker processes
    (dense_model.testing.spawn_workers: forked with torch and megatron-core already imported), for
    tests whose point is what the trainer does, not the launcher around it (run_pretrain.sh and
    torchrun: ``launch``). ``trainer``: a picklable ``f(Trainer) -> Trainer subclass`` to run
    instead. Returns (the highest exit code of the ranks, rank 0's output)."""
    import tempfile

    from dense_model.testing import spawn_workers

    with tempfile.TemporaryDirectory() as out_dir:
        spawn_workers(_train_job, nproc, str(config), list(overrides), out_dir, trainer)
        codes, outputs = [], []
        for rank in range(nproc):
            code, out = (Path(out_dir) / f"rank{rank}.txt").read_text().split("\n", 1)
            codes.append(int(code))
            outputs.append(out)
    return max(codes), outputs[0]


def launched_ok(config, *overrides, nproc=1, env=None):
    """A job through run_pretrain.sh (the launcher, torchrun, the workers) that must succeed: its output."""
    code, out = finish(launch(config, *overrides, nproc=nproc, env=env))
    assert code == 0, out
    return out


def trained_ok(config, *overrides, nproc=1):
    """The trainer alone (train_in_workers), where the launcher is not what a test is about, and it
    must succeed: rank 0's output."""
    code, out = train_in_workers(config, *overrides, nproc=nproc)
    assert code == 0, out
    return out
