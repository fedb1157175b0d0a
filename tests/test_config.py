"""Config loading, overrides and every validation error, with the field named in the message."""

import pytest

from dense_model.config import ConfigError, ffn_hidden_size, load_config, validate


def tiny(*overrides):
    return load_config(
        None, ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4", *overrides]
    )


def test_yaml_base_chain_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "model:\n  hidden_size: 128\n  activation: swiglu\ntraining:\n  lr: 3.0e-4\n"
    )
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel:\n  activation: polynorm\n")
    cfg = load_config(tmp_path / "child.yaml", ["training.lr=1e-3", "model.activation_kwargs={order: 2}"])
    assert cfg.model.hidden_size == 128 and cfg.model.activation == "polynorm"
    assert cfg.training.lr == pytest.approx(1e-3) and cfg.model.activation_kwargs == {"order": 2}


def test_parameter_matched_ffn_width():
    assert ffn_hidden_size(tiny("model.activation=swiglu").model) == 5504
    assert ffn_hidden_size(tiny("model.activation=polynorm").model) == 8256
    assert ffn_hidden_size(tiny("model.activation=gelu", "model.ffn_hidden_size=100").model) == 100


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.hiden_size=3"], r"unknown config key 'model.hiden_size'; valid keys here: num_layers"),
        (["trainer.lr=3"], r"unknown config key 'trainer'"),
        (
            ["model.activation=swishy"],
            r"model.activation: unknown activation 'swishy'; known activations: .*polynorm",
        ),
        (
            ["model.num_attention_heads=5"],
            r"model.hidden_size=64 is not divisible by model.num_attention_heads=5",
        ),
        (
            ["parallel.tensor_model_parallel_size=8"],
            r"num_attention_heads=4 is not divisible by parallel.tensor_model_parallel_size=8",
        ),
        (
            ["model.activation=gelu", "model.ffn_hidden_size=101", "parallel.tensor_model_parallel_size=2"],
            r"FFN width 101 .* not divisible by parallel.tensor_model_parallel_size=2; set model.ffn_hidden_size to a multiple of 2",
        ),
        (
            ["parallel.pipeline_model_parallel_size=3"],
            r"model.num_layers=4 is not divisible by parallel.pipeline_model_parallel_size=3",
        ),
        (["model.num_layers=four"], r"model.num_layers: expected an integer, got 'four'"),
        (["training.bf16=maybe"], r"training.bf16: expected true or false, got 'maybe'"),
        (["training.lr=fast"], r"training.lr: expected a number"),
        (["training.recompute_granularity=some"], r"training.recompute_granularity: 'some' is not one of"),
        (["model.activation_kwargs={order: 0}"], r"model.activation_kwargs: polynorm rejects"),
        (["model=3"], r"model: expected a section"),
        (["model.activation"], r"not key=value"),
    ],
)
def test_config_errors_name_the_field_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        cfg = (
            tiny("model.activation=polynorm", *overrides)
            if "model.activation=" not in " ".join(overrides)
            else tiny(*overrides)
        )
        validate(cfg)


def test_world_size_checks():
    cfg = tiny("parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2")
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by .* = 2 x 2 = 4"):
        validate(cfg, world_size=6)
    cfg = tiny("training.micro_batch_size=2", "training.global_batch_size=6")
    with pytest.raises(
        ConfigError, match=r"global_batch_size=6 is not divisible by .* 2 x 2; use a multiple of 4"
    ):
        validate(cfg, world_size=2)
    validate(tiny(), world_size=32)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
