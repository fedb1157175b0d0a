"""A tiny model config that trains on the session's mmap dataset (tests/conftest.py)."""

import pytest

from dense_model.testing import tiny_model_overrides


def tiny_overrides(run_dir, prefix, spm_model, *extra):
    """A 4-layer PolyNorm model small enough for a 2-core CPU, with every-step logging."""
    return [
        f"run_dir={run_dir}",
        *tiny_model_overrides(layers=4, swiglu_ffn=128),
        "training.micro_batch_size=2",
        "training.global_batch_size=8",
        "training.train_iters=12",
        "training.lr=3e-3",
        "training.min_lr=3e-4",
        "training.lr_warmup_iters=2",
        "training.recompute_granularity=none",
        f"data.paths=[{prefix}]",
        f"data.tokenizer_model={spm_model}",
        "data.split=90,10,0",
        "data.num_workers=0",
        "checkpoint.save_interval=4",
        "checkpoint.keep_last=2",
        "logging.log_interval=1",
        "logging.eval_interval=6",
        "logging.eval_iters=2",
        "logging.tensorboard=true",
        # a rank that hangs (a collective one rank never joins) fails the test in minutes, not 30
        "parallel.distributed_timeout_minutes=5",
        *extra,
    ]


def config_writer(folder, prefix, spm_model):
    """make(name, *extra) writes the tiny model's config as folder/name.yaml -> (config_path, run_dir)."""
    import yaml

    from dense_model.config import parse_overrides

    def make(name="run", *extra):
        run_dir = folder / name
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(parse_overrides(tiny_overrides(run_dir, prefix, spm_model, *extra))))
        return path, run_dir

    return make


@pytest.fixture
def tiny_config(tmp_path, mmap_dataset, spm_model):
    """Write the tiny model's config as a YAML file; returns (config_path, run_dir)."""
    return config_writer(tmp_path, mmap_dataset, spm_model)


@pytest.fixture(scope="module")
def module_tiny_config(tmp_path_factory, mmap_dataset, spm_model):
    """tiny_config for runs that several tests of a module share (e.g. one reference run)."""
    return config_writer(tmp_path_factory.mktemp("shared_runs"), mmap_dataset, spm_model)
