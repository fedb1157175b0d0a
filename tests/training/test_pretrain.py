"""The training loop end to end, as real processes: resume, signals and kills through run_pretrain.sh;
the NaN policy and the parallel layouts through the trainer's own entry point on gloo ranks."""

import json
import math
import os
import signal
import sys
import time

import psutil
import pytest

from dense_model.training.pretrain import HOLD_AFTER_STEP_ENV
from tests.training.pretrain_jobs import (
    REPO,
    finish,
    job_processes,
    kill_job,
    launch,
    launched_ok,
    read_metrics,
    train_in_workers,
    trained_ok,
)

pytestmark = pytest.mark.slow


def test_trains_logs_and_checkpoints(tiny_config):
    config, run_dir = tiny_config("base")
    out = launched_ok(config)
    train, valid = read_metrics(run_dir)
    assert sorted(train) == list(range(1, 13))
    assert train[12] < train[1] - 0.5, train  # the loss falls
    assert set(valid) == {6, 12}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec"} <= set(records[0])
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text() == "12"
    assert sorted(p.name for p in ckpts.glob("iter_*")) == ["iter_0000008", "iter_0000012"]  # keep_last=2
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "config.yaml").is_file()
    assert "done: 12 steps" in out
    # One Python checks the config, prints torchrun's command line before the job's output, runs it.
    command = out.splitlines()[0]
    assert " -m torch.distributed.run --nnodes 1 --node_rank 0 --nproc_per_node 1 " in command, out
    assert command.endswith(f"-m dense_model.training.pretrain {config}"), command


def test_launcher_sigkill_ends_workers_and_relaunch_resumes_exactly_with_dropout(tiny_config):
    """SIGKILL of run_pretrain.sh's process group (torchrun's workers are outside it): the workers
    die with their agent, the dead job's claim does not block the relaunch, the relaunch repeats the
    uninterrupted run's losses bitwise with dropout on (every piece of RNG state restored), and
    metrics.jsonl (as plot_runs.py reads it) holds each step once, the killed attempt set aside."""
    sys.path.insert(0, str(REPO / "scripts"))
    from plot_runs import read_run

    dropout = ("model.hidden_dropout=0.1", "model.attention_dropout=0.1")
    config, ref_dir = tiny_config("reference", *dropout)
    trained_ok(config)  # the uninterrupted run: the trainer alone
    reference, _ = read_metrics(ref_dir)

    config, run_dir = tiny_config("killed", *dropout)
    # the workers hold after step 10 (step-8 checkpoint complete, steps 9 and 10 logged) until the
    # kill: reading the log alone, a loaded machine let them save step 12 before the kill landed
    proc = launch(config, env={HOLD_AFTER_STEP_ENV: "10"})
    for line in proc.stdout:
        if line.startswith("holding after step 10"):
            break
    processes = job_processes(proc)
    assert any("dense_model.training.pretrain" in p.cmdline() for p in processes)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive, f"processes of the job left after its launcher was killed: {alive}"
    assert (run_dir / "checkpoints/latest_checkpointed_iteration.txt").read_text() == "8"
    assert (run_dir / "job.lock").exists()  # left by the killed job

    out = launched_ok(config)
    assert "resumed from" in out and "at step 8" in out
    resumed, _ = read_metrics(run_dir)
    for step in range(9, 13):
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])  # bitwise
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
    killed = [json.loads(x) for x in (run_dir / "metrics.attempt-1.jsonl").read_text().splitlines()]
    assert {9, 10} <= {r["step"] for r in killed} and all(r["step"] > 8 for r in killed)
    train, _ = read_run(run_dir)
    assert sorted(train) == list(range(1, 13))
    assert [train[s]["loss"] for s in range(9, 13)] == [reference[s] for s in range(9, 13)]
    assert not (run_dir / "job.lock").exists()  # released at the end


def test_second_job_on_a_busy_run_directory_is_refused(tiny_config):
    config, run_dir = tiny_config("busy")
    first = launch(config, "training.train_iters=16")
    for line in first.stdout:
        if line.startswith("step       1 |"):
            break
    holder = json.loads((run_dir / "job.lock").read_text())
    code, out = finish(launch(config, "training.train_iters=16"))  # its own rendezvous port
    assert code == 2, out
    (line,) = out.strip().splitlines()  # one line, and torchrun never started
    assert line.startswith(f"error: run directory {run_dir} is in use by job "), line
    assert f"(host {holder['host']}, pid {holder['pid']}, since " in line and "pick another run_dir=" in line
    code, rest = finish(first)
    assert code == 0, rest
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 17))
    assert not (run_dir / "job.lock").exists()


def test_sigterm_saves_and_exits_cleanly(tiny_config):
    config, run_dir = tiny_config("preempted")
    proc = launch(config, "training.train_iters=200", "checkpoint.save_interval=1000")
    for line in proc.stdout:
        if line.startswith("step       3 |"):
            proc.send_signal(signal.SIGTERM)
            break
    code, out = finish(proc)
    assert code == 0, out
    latest = int((run_dir / "checkpoints/latest_checkpointed_iteration.txt").read_text())
    assert 3 <= latest < 200
    assert "received SIGTERM" in out
    out = trained_ok(config, "training.train_iters=" + str(latest + 1), "checkpoint.save_interval=1000")
    assert f"at step {latest}" in out  # the SIGTERM checkpoint loads


def test_save_killed_midway_keeps_previous_checkpoint(tiny_config):
    config, run_dir = tiny_config("torn")
    proc = launch(config)
    tmp = run_dir / "checkpoints/iter_0000008.tmp"
    deadline = time.time() + 300
    while not tmp.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    kill_job(proc)
    assert tmp.exists() and not (run_dir / "checkpoints/iter_0000008").exists(), "the kill missed the save"
    assert (run_dir / "checkpoints/latest_checkpointed_iteration.txt").read_text() == "4"
    out = trained_ok(config)  # the torn save's leftovers cleared, the step-4 checkpoint loads
    assert "at step 4" in out and not tmp.exists()


@pytest.mark.parametrize("policy", ["stop", "skip"])
@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nan_policy(tiny_config, policy, where):
    from functools import partial

    from tests.training.inject_nan import nan_trainer

    config, run_dir = tiny_config(f"nan_{where}_{policy}")
    code, out = train_in_workers(
        config, f"training.nan_policy={policy}", trainer=partial(nan_trainer, where, 6)
    )
    what = "the loss is NaN or Inf" if where == "loss" else "a gradient is NaN or Inf"
    if policy == "stop":
        assert code != 0
        assert f"step 6: {what}" in out and "stopping before the optimizer step" in out
        assert (run_dir / "checkpoints/latest_checkpointed_iteration.txt").read_text() == "4"
        assert not (run_dir / "checkpoints/iter_0000008").exists()
    else:
        assert code == 0, out
        assert f"step 6: {what}" in out and "skipping this step" in out
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if "loss" in r]
        assert train[-1]["skipped_steps"] == 1 and all(
            map(math.isfinite, (r["loss"] for r in train if r["step"] != 6))
        )
        assert math.isfinite(train[-1]["loss"])  # the weights were not poisoned


def _first_losses(run_dir, n=4):
    train, _ = read_metrics(run_dir)
    return [train[s] for s in range(1, n + 1)]


SHORT = ["training.train_iters=4", "checkpoint.save_interval=1000", "logging.eval_interval=0"]


@pytest.fixture(scope="module")
def single_process_run(module_tiny_config):
    """The one-process reference of the two-process layouts (one run for all of them)."""
    config, ref_dir = module_tiny_config("single")
    trained_ok(config, *SHORT, "parallel.use_distributed_optimizer=false")
    return ref_dir


@pytest.mark.parametrize(
    "layout",
    [
        ("tp2", ["parallel.tensor_model_parallel_size=2"]),
        ("pp2", ["parallel.pipeline_model_parallel_size=2"]),
        ("dp2_distopt", ["parallel.use_distributed_optimizer=true"]),
    ],
    ids=lambda x: x[0],
)
def test_two_process_layouts_match_single_process(tiny_config, single_process_run, layout):
    name, overrides = layout
    ref_dir = single_process_run
    config, run_dir = tiny_config(name)
    trained_ok(config, *SHORT, *overrides, nproc=2)
    for ours, ref in zip(_first_losses(run_dir), _first_losses(ref_dir)):
        assert ours == pytest.approx(ref, rel=1e-5)


def _read_model_tensors(rank, world_size, folder, out_file):
    """megatron-core's reader needs a process group: a one-process gloo group."""
    import torch
    import torch.distributed as dist
    from megatron.core.dist_checkpointing import load_plain_tensors

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    state = load_plain_tensors(folder)
    model_keys = ("embedding.", "decoder.", "output_layer.")  # the GPTModel's, not the optimizer's
    torch.save({k: v for k, v in state.items() if k.startswith(model_keys)}, out_file)


def test_overlap_param_gather_saves_the_updated_weights(tiny_config, tmp_path):
    """With the distributed optimizer and overlap_param_gather the last step's all-gather waits for
    the next forward; the save (here right after the last step: no evaluation) must finish it."""
    import torch

    from dense_model.testing import spawn_workers

    short = ["training.train_iters=3", "checkpoint.save_interval=1000", "logging.eval_iters=0"]
    weights = {}
    for overlap in ("false", "true"):
        config, run_dir = tiny_config(f"overlap_{overlap}")
        trained_ok(
            config,
            *short,
            "parallel.use_distributed_optimizer=true",
            f"parallel.overlap_param_gather={overlap}",
            "parallel.overlap_grad_reduce=true",
            nproc=2,
        )
        out = tmp_path / f"weights_{overlap}.pt"
        spawn_workers(_read_model_tensors, 1, str(run_dir / "checkpoints/iter_0000003"), str(out))
        weights[overlap] = torch.load(out)
    assert weights["true"].keys() == weights["false"].keys() and len(weights["true"]) > 10
    differ = [k for k in weights["true"] if not torch.equal(weights["true"][k], weights["false"][k])]
    assert not differ, f"{len(differ)} of {len(weights['true'])} tensors differ: {differ[:3]}"


def test_checkpoint_saved_at_tp2_loads_at_tp1_with_same_validation_loss(tiny_config):
    """A TP change needs the optimizer state saved fully_reshardable (dp_reshardable, the default,
    reshards only over DP: tests/training/test_checkpoint_format.py)."""
    config, run_dir = tiny_config("reshard", "checkpoint.optimizer_format=fully_reshardable")
    trained_ok(config, "training.train_iters=6", "parallel.tensor_model_parallel_size=2", nproc=2)
    _, valid_tp2 = read_metrics(run_dir)
    out = trained_ok(config, "training.train_iters=6", "parallel.tensor_model_parallel_size=1")
    assert "at step 6" in out
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert len(lines) == 2 and lines[0]["step"] == lines[1]["step"] == 6
    assert lines[1]["val_loss"] == pytest.approx(valid_tp2[6], rel=1e-5)
