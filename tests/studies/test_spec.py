"""The study file: seeds per seed_mode, the run grid, and one-line errors for bad input."""

import json
from pathlib import Path

import pytest

from dense_model.config import ConfigError
from dense_model.studies.spec import load_study

DEMO = str(Path(__file__).resolve().parents[2] / "configs/demo.yaml")


def write(tmp_path, **fields) -> Path:
    study = {
        "name": "s",
        "base_config": DEMO,
        "activations": ["polynorm", "swiglu"],
        "seeds": [1, 2],
        **fields,
    }
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(study))
    return path


@pytest.mark.parametrize(
    "mode, init, data",
    [("init_and_data", [1, 2], [1, 2]), ("init", [1, 2], [7, 7]), ("data", [7, 7], [1, 2])],
)
def test_seed_mode_sets_init_and_data_seeds(tmp_path, mode, init, data):
    study = load_study(write(tmp_path, seed_mode=mode, fixed_seed=7, baseline="swiglu"), tmp_path / "out")
    polynorm = [r for r in study.runs() if r.activation == "polynorm"]
    configs = [study.run_config(r) for r in polynorm]
    assert [c.training.seed for c in configs] == init
    assert [c.training.data_seed for c in configs] == data
    assert [c.run_dir for c in configs] == [
        str(tmp_path / "out/runs/polynorm_s1"),
        str(tmp_path / "out/runs/polynorm_s2"),
    ]


def test_grid_with_variants_and_per_activation_overrides(tmp_path):
    path = write(
        tmp_path,
        variants={"lr1e-3": ["training.lr=1e-3"], "lr3e-3": ["training.lr=3e-3"]},
        activation_overrides={"polynorm": ["model.activation_kwargs={order: 2}"]},
        overrides=["training.train_iters=7", "training.lr_warmup_iters=2"],
    )
    study = load_study(path)
    runs = study.runs()
    assert [r.name for r in runs[:4]] == [
        "polynorm_lr1e-3_s1",
        "swiglu_lr1e-3_s1",
        "polynorm_lr1e-3_s2",
        "swiglu_lr1e-3_s2",
    ]
    assert len(runs) == 8 and study.baseline == "polynorm"  # default baseline: the first activation
    cfg = study.run_config(runs[-2])  # polynorm_lr3e-3_s2
    assert (cfg.training.lr, cfg.training.train_iters, cfg.model.activation_kwargs) == (3e-3, 7, {"order": 2})
    assert study.run_config(runs[-1]).model.activation_kwargs == {}


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"seed": [1]}, "seed: unknown key"),
        ({"baseline": "gelu"}, "baseline: 'gelu' is not one of the activations"),
        ({"seed_mode": "both"}, "seed_mode: 'both' is not one of"),
        ({"seeds": [1, 1]}, "seeds: a seed appears twice"),
        ({"base_config": "nope.yaml"}, "base_config: "),
        ({"variants": {"x": ["training.lr"]}}, "variants.x: 'training.lr' is not key=value"),
        ({"overrides": ["model.hidden_size=250"]}, "run polynorm_s1: model.hidden_size=250 is not divisible"),
        ({"activations": ["polynorm", "nope"]}, "run nope_s1: model.activation"),
    ],
)
def test_bad_study_files_name_the_file_and_the_field(tmp_path, fields, message):
    path = write(tmp_path, **fields)
    with pytest.raises(ConfigError, match="study file") as err:
        load_study(path)
    assert message in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)
