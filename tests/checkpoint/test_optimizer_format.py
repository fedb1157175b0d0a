"""Loading a distributed-optimizer checkpoint at another TP: refused with the fix named when it was
saved dp_reshardable (the default), loaded when saved fully_reshardable. In-process save and load
over gloo, no training run."""

import pytest

from dense_model.testing import spawn_workers


def _config(tp: int, optimizer_format: str):
    from dense_model.config import load_config
    from dense_model.testing import tiny_model_overrides

    return load_config(
        None,
        [
            *tiny_model_overrides(layers=1),
            f"parallel.tensor_model_parallel_size={tp}",
            "parallel.use_distributed_optimizer=true",
            f"checkpoint.optimizer_format={optimizer_format}",
        ],
    )


def _save(rank, world_size, root, optimizer_format):
    import torch

    from dense_model.checkpoint import save_checkpoint
    from dense_model.parallel import initialize_parallel
    from dense_model.training.optim import build_training_model

    initialize_parallel(world_size, 1, seed=1)
    cfg = _config(world_size, optimizer_format)
    model, ddp, optimizer = build_training_model(cfg)
    for p in model.parameters():
        p.main_grad.copy_(torch.full_like(p, 0.01))
    optimizer.step()  # the optimizer has state (Adam moments, step) to save
    save_checkpoint(root, 1, ddp, cfg, optimizer)


def _load(rank, world_size, root, optimizer_format, out_file):
    from dense_model.checkpoint import CheckpointError, load_checkpoint
    from dense_model.parallel import initialize_parallel
    from dense_model.training.optim import build_training_model

    initialize_parallel(world_size, 1, seed=1)
    _, ddp, optimizer = build_training_model(_config(world_size, optimizer_format))
    try:
        load_checkpoint(root, ddp, optimizer)
        result = "loaded"
    except CheckpointError as err:
        result = str(err)
    with open(out_file, "w") as f:
        f.write(result)


@pytest.mark.parametrize("optimizer_format", ["dp_reshardable", "fully_reshardable"])
def test_tp2_checkpoint_at_tp1(tmp_path, optimizer_format):
    root = tmp_path / "checkpoints"
    spawn_workers(_save, 2, str(root), optimizer_format)
    out = tmp_path / "result.txt"
    spawn_workers(_load, 1, str(root), optimizer_format, str(out))
    result = out.read_text()
    if optimizer_format == "fully_reshardable":
        assert result == "loaded"
    else:
        assert "dp_reshardable" in result and "'TP': 2" in result and "'TP': 1" in result, result
        assert "checkpoint.optimizer_format=fully_reshardable" in result, result
