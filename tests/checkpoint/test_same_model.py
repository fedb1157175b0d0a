"""plan_run_load refuses a checkpoint of another model (a shape cannot change mid-run) in one line
naming each field, the checkpoint's and the config's values and the fix, before anything loads;
what can change on a relaunch (schedule, layout, dropout, fusions) passes. On real metadata files,
no training; the trainer's refusal: tests/training/test_schedule_change.py."""

import pytest

from dense_model.checkpoint import layout
from dense_model.config import Config, config_from_dict, config_to_dict


def _config(run_dir, **model) -> Config:
    cfg = Config(run_dir=str(run_dir))
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads = 2, 64, 4
    cfg.model.activation, cfg.model.swiglu_ffn_hidden_size = "polynorm", 128
    cfg.data.demo = True  # the vocabulary resolves to the demo tokenizer's without a file
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


def _saved_run(run_dir, cfg: Config) -> None:
    """The run's step-4 checkpoint as far as plan_run_load reads it: its metadata and the tracker."""
    saved = config_from_dict(config_to_dict(cfg))
    saved.model.vocab_size = 4096  # the trainer saves the resolved vocabulary
    folder = layout.iteration_dir(run_dir / "checkpoints", 4)
    folder.mkdir(parents=True)
    layout.write_metadata(folder, 4, saved)
    (run_dir / "checkpoints" / layout.TRACKER).write_text("4")


def test_a_checkpoint_of_another_model_shape_is_refused_naming_the_fields(tmp_path):
    _saved_run(tmp_path, _config(tmp_path))
    folder = tmp_path / "checkpoints/iter_0000004"
    changed = _config(tmp_path, hidden_size=128, swiglu_ffn_hidden_size=256)
    with pytest.raises(layout.CheckpointError) as err:
        layout.plan_run_load(changed)
    (line,) = str(err.value).splitlines()
    assert line == (
        f"{folder} holds a model with model.hidden_size=64, model.ffn_hidden_size=192, this config asks "
        "for model.hidden_size=128, model.ffn_hidden_size=384: a model cannot change shape in the middle "
        "of a run; set model.hidden_size=64, model.ffn_hidden_size=192 to continue from it, or train the "
        "new model in another run_dir (or with checkpoint.fresh=true and no checkpoint.load)"
    ), line
    for other in ({"activation": "swiglu"}, {"vocab_size": 8192}, {"num_layers": 3}):
        with pytest.raises(layout.CheckpointError, match=f"model.{next(iter(other))}="):
            layout.plan_run_load(_config(tmp_path, **other))


def test_what_may_change_on_a_relaunch_passes(tmp_path):
    _saved_run(tmp_path, _config(tmp_path))
    cfg = _config(tmp_path, hidden_dropout=0.1, fused_activation=False, seq_length=256)
    cfg.training.lr, cfg.training.train_iters = 1e-4, 99
    cfg.parallel.tensor_model_parallel_size = 2
    plan = layout.plan_run_load(cfg)
    assert plan.iteration == 4 and plan.mode == "resume"
    fresh = _config(tmp_path, hidden_size=128)
    fresh.checkpoint.fresh = True  # a fresh start loads nothing, whatever the old run's model
    assert layout.plan_run_load(fresh).folder is None


def test_the_launcher_refuses_another_shape_before_launch(tmp_path, capsys):
    """run_pretrain.sh's check (launcher.main): exit 2, one line, nothing written to the run."""
    from dense_model import launcher
    from dense_model.config import load_config

    run = tmp_path / "run"
    config = "configs/demo.yaml"
    _saved_run(run, load_config(config, [f"run_dir={run}"]))
    before = sorted(p.name for p in run.rglob("*"))
    assert launcher.main([config, f"run_dir={run}", "model.hidden_size=96"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert (
        line.startswith("config error: ") and "model.hidden_size=" in line and "cannot change shape" in line
    )
    assert sorted(p.name for p in run.rglob("*")) == before
