"""save_checkpoint(weights_only=True) (what an importer writes): the model alone, marked in its
metadata, loaded into a model with another initialisation; the optimizer passed to the load is
left as it was. In-process save and load over gloo, no training run."""

from dense_model.testing import spawn_workers


def _config():
    from dense_model.config import load_config
    from dense_model.testing import tiny_model_overrides

    return load_config(None, [*tiny_model_overrides(layers=1), "parallel.use_distributed_optimizer=false"])


def _save_and_load(rank, world_size, root, out_file):
    import torch
    from megatron.core import dist_checkpointing

    from dense_model.checkpoint import load_checkpoint, read_metadata, save_checkpoint
    from dense_model.parallel import initialize_parallel
    from dense_model.training.optim import build_training_model

    initialize_parallel(1, 1, seed=1)
    cfg = _config()
    source, source_ddp, _ = build_training_model(cfg)
    folder = save_checkpoint(root, 0, source_ddp, cfg, weights_only=True)
    common = dist_checkpointing.load_common_state_dict(str(folder))

    torch.manual_seed(7)
    cfg.training.seed = 7
    initialize_parallel(1, 1, seed=7)
    target, target_ddp, optimizer = build_training_model(cfg)
    differed = any(
        not torch.equal(a, b) for a, b in zip(source.parameters(), target.parameters(), strict=True)
    )
    load_checkpoint(root, target_ddp, optimizer)  # the optimizer is not in a weights-only checkpoint
    torch.save(
        {
            "meta": read_metadata(folder),
            "common_keys": sorted(common),
            "differed": differed,
            "equal": all(
                torch.equal(a, b) for a, b in zip(source.parameters(), target.parameters(), strict=True)
            ),
            "optimizer_state": len(optimizer.optimizer.state) if hasattr(optimizer, "optimizer") else None,
        },
        out_file,
    )


def test_weights_only_checkpoint_holds_and_loads_the_model_alone(tmp_path):
    import torch

    out = tmp_path / "result.pt"
    spawn_workers(_save_and_load, 1, str(tmp_path / "checkpoints"), str(out))
    result = torch.load(out, weights_only=False)
    assert result["meta"]["weights_only"] is True and result["meta"]["iteration"] == 0
    assert "optimizer" not in result["common_keys"] and "rng_state" not in result["common_keys"]
    assert result["differed"] and result["equal"]
    assert result["optimizer_state"] == 0
