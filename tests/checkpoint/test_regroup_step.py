"""An MoE checkpoint saved at EP=2 (a chain of two optimizers: dense, experts) loads at EP=1 (one
optimizer) with Adam's step: after 3 steps, every loaded parameter state says step 3, so the bias
correction continues instead of starting over. In-process save and load over gloo."""

from dense_model.testing import spawn_workers

STEPS = 3


def _config(ep: int):
    from dense_model.config import load_config
    from dense_model.testing import tiny_model_overrides

    return load_config(
        None,
        [
            *tiny_model_overrides(layers=1),
            "model.moe.num_experts=4",
            "model.moe.router_topk=2",
            "model.moe.ffn_hidden_size=32",
            f"parallel.expert_model_parallel_size={ep}",
            "parallel.use_distributed_optimizer=false",
            "training.recompute_granularity=none",
        ],
    )


def _adam_steps(optimizer) -> list[float]:
    from dense_model.checkpoint.state import _sub_optimizers

    return [
        float(state["step"])
        for sub in _sub_optimizers(optimizer)
        for state in sub.optimizer.state.values()
        if "step" in state
    ]


def _save(rank, world_size, root):
    import torch

    from dense_model.checkpoint import save_checkpoint
    from dense_model.parallel import initialize_parallel_from
    from dense_model.training.optim import build_training_model

    cfg = _config(world_size)
    initialize_parallel_from(cfg.parallel, seed=1)
    model, ddp, optimizer = build_training_model(cfg)
    assert len(optimizer.chained_optimizers) == 2  # dense and expert parameters apart at EP=2
    for _ in range(STEPS):
        for p in model.parameters():
            p.main_grad.copy_(torch.full_like(p, 0.01))
        optimizer.step()
    assert set(_adam_steps(optimizer)) == {float(STEPS)}
    save_checkpoint(root, STEPS, ddp, cfg, optimizer)


def _load(rank, world_size, root, out_file):
    import torch

    from dense_model.checkpoint import load_checkpoint
    from dense_model.parallel import initialize_parallel_from
    from dense_model.training.optim import build_training_model

    cfg = _config(world_size)
    initialize_parallel_from(cfg.parallel, seed=1)
    _, ddp, optimizer = build_training_model(cfg)
    load_checkpoint(root, ddp, optimizer)
    torch.save(
        {"steps": _adam_steps(optimizer), "chain": len(getattr(optimizer, "chained_optimizers", [0]))},
        out_file,
    )


def test_ep2_save_loads_at_ep1_with_the_saved_adam_step(tmp_path):
    import torch

    root = tmp_path / "checkpoints"
    spawn_workers(_save, 2, str(root))
    out = tmp_path / "loaded.pt"
    spawn_workers(_load, 1, str(root), str(out))
    loaded = torch.load(out)
    assert loaded["chain"] == 1  # the regrouping path: EP=1 has one optimizer
    assert loaded["steps"] and all(step == STEPS for step in loaded["steps"]), loaded["steps"]
