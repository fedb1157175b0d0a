"""The training loop end to end, as real processes: resume, signals, NaN policy, parallel layouts."""

import json
import math
import signal
import time

import pytest

from tests.training.pretrain_jobs import finish, kill_job, launch, read_metrics

pytestmark = pytest.mark.slow


def run_ok(config, *overrides, nproc=1, env=None):
    code, out = finish(launch(config, *overrides, nproc=nproc, env=env))
    assert code == 0, out
    return out


def test_trains_logs_and_checkpoints(tiny_config):
    config, run_dir = tiny_config("base")
    out = run_ok(config)
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


def test_exact_resume_after_sigkill(tiny_config):
    config, ref_dir = tiny_config("reference")
    run_ok(config)
    reference, _ = read_metrics(ref_dir)

    config, run_dir = tiny_config("killed")
    proc = launch(config)
    for line in proc.stdout:  # kill the whole job right after the step-8 checkpoint is complete
        if "saved checkpoint" in line and "iter_0000008" in line:
            kill_job(proc)
            break
    assert (run_dir / "checkpoints/latest_checkpointed_iteration.txt").read_text() == "8"
    out = run_ok(config)
    assert "resumed from" in out and "at step 8" in out
    resumed, _ = read_metrics(run_dir)
    for step in range(9, 13):
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])  # bitwise


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
    out = run_ok(config, "training.train_iters=" + str(latest + 1), "checkpoint.save_interval=1000")
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
    out = run_ok(config)
    assert "at step 4" in out and not tmp.exists()


@pytest.mark.parametrize("policy", ["stop", "skip"])
@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nan_policy(tiny_config, policy, where):
    config, run_dir = tiny_config(f"nan_{where}_{policy}")
    proc = launch(
        config, f"training.nan_policy={policy}", env={"DENSE_MODEL_INJECT_NAN_AT_STEP": f"{where}:6"}
    )
    code, out = finish(proc)
    what = "loss is nan" if where == "loss" else "a gradient is NaN or Inf"
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


@pytest.mark.parametrize(
    "layout",
    [
        ("tp2", ["parallel.tensor_model_parallel_size=2"]),
        ("pp2", ["parallel.pipeline_model_parallel_size=2"]),
        ("dp2_distopt", ["parallel.use_distributed_optimizer=true"]),
    ],
    ids=lambda x: x[0],
)
def test_two_process_layouts_match_single_process(tiny_config, layout):
    name, overrides = layout
    short = ["training.train_iters=4", "checkpoint.save_interval=1000", "logging.eval_interval=0"]
    config, ref_dir = tiny_config("single")
    run_ok(config, *short, "parallel.use_distributed_optimizer=false")
    config, run_dir = tiny_config(name)
    run_ok(config, *short, *overrides, nproc=2)
    for ours, ref in zip(_first_losses(run_dir), _first_losses(ref_dir)):
        assert ours == pytest.approx(ref, rel=1e-5)


def test_checkpoint_saved_at_tp2_loads_at_tp1_with_same_validation_loss(tiny_config):
    config, run_dir = tiny_config("reshard")
    run_ok(config, "training.train_iters=6", "parallel.tensor_model_parallel_size=2", nproc=2)
    _, valid_tp2 = read_metrics(run_dir)
    out = run_ok(config, "training.train_iters=6", "parallel.tensor_model_parallel_size=1")
    assert "at step 6" in out
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert len(lines) == 2 and lines[0]["step"] == lines[1]["step"] == 6
    assert lines[1]["val_loss"] == pytest.approx(valid_tp2[6], rel=1e-5)
