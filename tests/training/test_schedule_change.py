"""A relaunch with a changed schedule (training.lr, min_lr, train_iters): the config's schedule
applies from the checkpoint's step on, the job says so in one line, metrics.jsonl logs the learning
rate each step's update used and an event for the change, and the checkpoints' metadata records the
schedule in force and the run's history of changes; a relaunch with another model shape is refused
in one line (the trainer's entry point on a gloo rank)."""

import json
import math
import shutil

import pytest

from tests.training.pretrain_jobs import read_metrics, train_in_workers, trained_ok

pytestmark = pytest.mark.slow

EVERY_4 = [
    "training.train_iters=8",
    "logging.eval_interval=0",
    "checkpoint.save_interval=4",
    "checkpoint.keep_last=3",
]
WARMUP = 2  # the tiny config's training.lr_warmup_iters


def lr_formula(n, lr, min_lr, train_steps, warmup=WARMUP):
    """megatron-core's linear warmup from 0, then cosine to min_lr, after n completed steps."""
    if n <= warmup:
        return lr * n / warmup
    if n > train_steps:
        return min_lr
    ratio = (n - warmup) / (train_steps - warmup)
    return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (lr - min_lr)


def lrs(run_dir):
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in records if "loss" in r}


def test_a_relaunch_with_a_new_lr_and_length_applies_them_from_the_checkpoints_step(tiny_config, tmp_path):
    config, ref_dir = tiny_config("reference", *EVERY_4)
    trained_ok(config)  # 8 steps at lr 3e-3 -> 3e-4, uninterrupted (= an unchanged relaunch: exact resume)
    reference, _ = read_metrics(ref_dir)
    for step, lr in lrs(ref_dir).items():  # the lr step k's update used: the formula after k - 1 steps
        assert lr == pytest.approx(lr_formula(step - 1, 3e-3, 3e-4, 8), rel=1e-12), step

    # The run stopped at its step-4 checkpoint; relaunched with a lower lr and min_lr, and longer.
    config, run_dir = tiny_config("changed", *EVERY_4)
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref_dir / "checkpoints/iter_0000004", run_dir / "checkpoints/iter_0000004")
    (run_dir / "checkpoints/latest_checkpointed_iteration.txt").write_text("4")
    new = ["training.lr=1e-3", "training.min_lr=1e-4", "training.train_iters=10"]
    out = trained_ok(config, *new)
    (line,) = [x for x in out.splitlines() if x.startswith("schedule changed")]
    assert line.startswith(
        "schedule changed since the checkpoint of step 4: lr 0.003 -> 0.001, min_lr 0.0003 -> 0.0001, "
        "train_steps 8 -> 10; the config's schedule applies from step 5 (lr "
    ), line
    used = lrs(run_dir)
    assert sorted(used) == list(range(5, 11))
    for step, lr in used.items():  # the new formula at each step, the warm-up not restarted
        assert lr == pytest.approx(lr_formula(step - 1, 1e-3, 1e-4, 10), rel=1e-12), step
    losses, _ = read_metrics(run_dir)
    # Step 5's loss comes before its update: the checkpoint's weights and data position.
    assert losses[5] == reference[5]
    assert all(losses[s] != reference[s] for s in range(6, 9)), (losses, reference)

    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    changes = {"lr": [3e-3, 1e-3], "min_lr": [3e-4, 1e-4], "train_steps": [8, 10]}
    (event,) = [r for r in records if r.get("event") == "schedule_change"]
    assert event == {"step": 5, "event": "schedule_change", "resumed_from": 4, "changes": changes}
    meta = json.loads((run_dir / "checkpoints/iter_0000010/dense_model.json").read_text())
    assert meta["config"]["training"]["lr"] == 1e-3
    assert meta["schedule"] == {
        "lr": 1e-3, "min_lr": 1e-4, "lr_decay_style": "cosine", "warmup_steps": WARMUP, "train_steps": 10,
        "lr_warmup_init": 0.0, "warmup_tokens": None, "lr_decay_tokens": None, "weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1e-8, "step": 10,
    }  # fmt: skip
    assert meta["schedule_history"] == [{"step": 4, "changes": changes}]

    # One more change later: the history keeps both.
    out = trained_ok(config, *new[:2], "training.train_iters=11", "training.adam_beta2=0.99")
    assert (
        "schedule changed since the checkpoint of step 10: train_steps 10 -> 11, adam_beta2 0.95 -> 0.99"
        in out
    )
    meta = json.loads((run_dir / "checkpoints/iter_0000011/dense_model.json").read_text())
    assert meta["schedule_history"] == [
        {"step": 4, "changes": changes},
        {"step": 10, "changes": {"train_steps": [10, 11], "adam_beta2": [0.95, 0.99]}},
    ]
    assert meta["schedule"]["adam_beta2"] == 0.99

    # A change that cannot apply mid-run (the model's shape) is refused in one line, nothing loaded.
    before = (run_dir / "config.yaml").read_text()
    code, out = train_in_workers(config, "model.num_layers=2")
    assert code == 2, out
    (line,) = out.strip().splitlines()
    assert line.startswith(
        f"config error: {run_dir}/checkpoints/iter_0000011 holds a model with model.num_layers=4"
    ), line
    assert "set model.num_layers=4 to continue from it" in line
    assert (run_dir / "config.yaml").read_text() == before
