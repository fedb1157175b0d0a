"""checkpoint.load, checkpoint.load_mode and checkpoint.fresh: what a job loads (the trainer's entry
point on a gloo rank), that it says so, what the check before launch refuses (run_pretrain.sh), that a relaunch resumes its own checkpoints, and that no save deletes the
tracker's checkpoint or anything above it."""

import shutil

import pytest

from tests.training.pretrain_jobs import finish, launch, read_metrics, trained_ok

pytestmark = pytest.mark.slow

# Checkpoints and validation at 4, 8, 12 (the tiny run's 12 steps), all kept.
EVERY_4 = ["logging.eval_interval=4", "checkpoint.save_interval=4", "checkpoint.keep_last=3"]


def _write_weights_only(rank, world_size, source, out):
    """A weights-only checkpoint as an importer writes one: the model's sharded state saved with
    dist_checkpointing (nothing else) and dense_model.json with "weights_only": true, iteration 0."""
    from pathlib import Path

    from megatron.core import dist_checkpointing

    from dense_model.checkpoint import load_checkpoint, read_metadata
    from dense_model.checkpoint.layout import write_metadata
    from dense_model.config import config_from_dict
    from dense_model.model import build_model
    from dense_model.parallel import initialize_parallel

    initialize_parallel(1, 1, seed=1)
    cfg = config_from_dict(read_metadata(source)["config"])
    model = build_model(cfg, initialize=False)
    load_checkpoint(source, model, load_rng=False)
    out = Path(out)
    out.mkdir()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(out))
    write_metadata(out, 0, cfg, weights_only=True)


def test_load_a_run_dir_resumes_it_a_relaunch_resumes_its_own_and_weights_start_at_step_0(
    tiny_config, tmp_path
):
    from dense_model.testing import spawn_workers

    config, ref_dir = tiny_config("reference", *EVERY_4)
    trained_ok(config)
    reference, ref_valid = read_metrics(ref_dir)

    # A run directory holding the reference's step-8 checkpoint (its latest).
    source = tmp_path / "source"
    shutil.copytree(ref_dir / "checkpoints/iter_0000008", source / "checkpoints/iter_0000008")
    (source / "checkpoints/latest_checkpointed_iteration.txt").write_text("8")

    # load=<run dir>, load_mode=resume (the default): the source's step, optimizer, schedule, data.
    config, run_dir = tiny_config("continued", *EVERY_4)
    out = trained_ok(config, f"checkpoint.load={source}")
    assert f"resumed from {source}/checkpoints/iter_0000008 at step 8 (checkpoint.load={source}" in out, out
    continued, _ = read_metrics(run_dir)
    assert sorted(continued) == [9, 10, 11, 12]
    for step in range(9, 13):
        assert continued[step] == reference[step], (step, continued[step], reference[step])  # bitwise
    # A relaunch (a preempted job's requeue) resumes its own checkpoint, not checkpoint.load's.
    out = trained_ok(config, f"checkpoint.load={source}", "training.train_iters=13")
    assert f"resumed from {run_dir}/checkpoints/iter_0000012 at step 12 (its own checkpoint" in out, out
    assert f"checkpoint.load={source} is not used" in out
    assert sorted(p.name for p in (source / "checkpoints").iterdir()) == [
        "iter_0000008",
        "latest_checkpointed_iteration.txt",
    ]

    # load_mode=weights from an iter_N folder, and a weights-only checkpoint in any load_mode: the
    # model only, from step 0. The first step's learning rate is 0 (warmup from 0), so the step-1
    # validation loss is the source model's (the reference's at step 8): same validation batches.
    imported = tmp_path / "imported"
    spawn_workers(_write_weights_only, 1, str(ref_dir / "checkpoints/iter_0000008"), str(imported))
    first_steps = {}
    for name, load in [
        ("weights", [f"checkpoint.load={ref_dir}/checkpoints/iter_0000008", "checkpoint.load_mode=weights"]),
        ("imported", [f"checkpoint.load={imported}"]),
    ]:
        config, run_dir = tiny_config(name, *EVERY_4)
        out = trained_ok(config, *load, "training.train_iters=3", "logging.eval_interval=1")
        assert "load_mode=weights): training starts at step 0 with a fresh optimizer" in out, out
        train, valid = read_metrics(run_dir)
        assert sorted(train) == [1, 2, 3]
        assert valid[1] == pytest.approx(ref_valid[8], rel=1e-6), (valid, ref_valid)
        first_steps[name] = train
    assert first_steps["weights"] == first_steps["imported"]  # the same weights, schedule and data
    assert first_steps["weights"][1] < reference[1] - 0.5  # not a fresh initialisation


@pytest.mark.parametrize("load", ["missing", "empty", "iter_without_metadata"])
def test_a_load_path_that_does_not_resolve_is_refused_before_launch(tiny_config, tmp_path, load):
    path = tmp_path / load
    if load == "empty":
        path.mkdir()
    if load == "iter_without_metadata":
        path = tmp_path / "r/checkpoints/iter_0000004"
        path.mkdir(parents=True)
    config, run_dir = tiny_config("refused")
    code, out = finish(launch(config, f"checkpoint.load={path}"))
    assert code == 2, out
    (line,) = out.strip().splitlines()  # one line, and torchrun never started
    assert line.startswith(f"config error: checkpoint.load={path}"), line
    assert "give a run directory" in line or "expected a run directory" in line or "is missing" in line
    assert not run_dir.exists()


def test_fresh_over_an_older_run_keeps_its_own_checkpoints_and_a_relaunch_resumes(tiny_config):
    """The older run's checkpoints (4, 8) are above the fresh run's saves (1, 2, 3): they are moved to
    checkpoints/stale/, never deleted, and the fresh run's own latest checkpoint is kept."""
    config, run_dir = tiny_config("used", "training.train_iters=8", "logging.eval_interval=0")
    trained_ok(config)
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("iter_*")) == ["iter_0000004", "iter_0000008"]

    fresh = ["training.train_iters=3", "checkpoint.save_interval=1", "checkpoint.keep_last=2"]
    out = trained_ok(config, "checkpoint.fresh=true", *fresh)
    assert f"checkpoint.fresh=true: not resuming {ckpts} (tracker at step 8)" in out, out
    assert f"moved {ckpts}/iter_0000008 aside to {ckpts}/stale/iter_0000008." in out, out
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert sorted(p.name for p in ckpts.glob("iter_*")) == ["iter_0000002", "iter_0000003"]
    stale = sorted(p.name.split(".")[0] for p in (ckpts / "stale").iterdir())
    assert stale == ["iter_0000004", "iter_0000008"]
    for folder in (ckpts / "stale").iterdir():  # intact: each still loads
        assert (folder / "dense_model.json").is_file() and (folder / "common.pt").is_file()

    out = trained_ok(config, "training.train_iters=4")
    assert f"resumed from {ckpts}/iter_0000003 at step 3 (its own checkpoint" in out, out
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text() == "4"


def test_fresh_from_the_runs_own_checkpoint_as_weights_keeps_what_it_loads(tiny_config):
    """checkpoint.load=<the run's own iter_N> with fresh=true and load_mode=weights: the run starts
    at step 0 from those weights; its saves (1, 2, 3) never delete the folder it loaded from."""
    config, run_dir = tiny_config("own", "training.train_iters=4", "logging.eval_interval=0")
    trained_ok(config)
    ckpts = run_dir / "checkpoints"
    own = ckpts / "iter_0000004"
    out = trained_ok(
        config,
        "checkpoint.fresh=true",
        f"checkpoint.load={own}",
        "checkpoint.load_mode=weights",
        "training.train_iters=3",
        "checkpoint.save_interval=1",
        "checkpoint.keep_last=1",
    )
    assert f"loaded the model weights of {own} (its step 4; load_mode=weights)" in out, out
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert sorted(p.name for p in ckpts.glob("iter_*")) == ["iter_0000003"]  # keep_last=1
    (aside,) = (ckpts / "stale").glob("iter_0000004.*")
    assert (aside / "common.pt").is_file()


def test_the_pre_launch_check_names_a_broken_tracker(tiny_config):
    config, run_dir = tiny_config("broken")
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints/latest_checkpointed_iteration.txt").write_text("10")
    code, out = finish(launch(config))
    assert code == 2, out
    (line,) = out.strip().splitlines()
    assert "points at iteration 10 but" in line and "iter_0000010/dense_model.json is missing" in line, line
