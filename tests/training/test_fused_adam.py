"""torch's fused AdamW inside megatron-core's optimizer (``training.fused_adam``): the trainer's
model, DDP and distributed optimizer on the CPU (one gloo rank), a few real steps on random tokens.
Fused equals the foreach path to fp32 rounding, resumes from its own checkpoint bitwise, and
checkpoints load both ways (saved fused, resumed unfused and vice versa) with the same losses."""

import pytest
import torch

from dense_model.testing import spawn_workers, tiny_model_overrides

STEPS, SAVED_AT = 4, 2


def _config(run_dir, fused):
    from dense_model.config import load_config

    return load_config(
        None,
        [
            *tiny_model_overrides(layers=2, seq=32),
            "training.micro_batch_size=2",
            "training.global_batch_size=2",
            "training.train_iters=8",
            "training.lr=3e-3",
            "training.lr_warmup_iters=1",
            "training.bf16=false",
            "training.recompute_granularity=none",
            "parallel.use_distributed_optimizer=true",
            f"training.fused_adam={str(fused).lower()}",
            f"run_dir={run_dir}",
        ],
    )


def _train(cfg, batches, start, stop, load=None, save=None):
    """Build the trainer's model and optimizer, optionally load a checkpoint, run steps
    [start, stop) (saving after step ``save``); returns (losses, final fp32 main params, optimizer)."""
    from dense_model.checkpoint.state import load_checkpoint, save_checkpoint
    from dense_model.training.optim import build_scheduler, build_training_model
    from dense_model.training.step import forward_backward, lm_loss

    model, ddp, optimizer = build_training_model(cfg)
    scheduler = build_scheduler(optimizer, cfg)
    if load is not None:
        load_checkpoint(load, ddp, optimizer, scheduler)
    losses = []
    for step in range(start, stop):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        out = forward_backward([ddp], iter([batches[step]]), 1, cfg.model.seq_length, 2)
        losses.append(lm_loss(out).item())
        applied, _, _ = optimizer.step()
        assert applied
        scheduler.step(1)
        if save == step + 1:
            save_checkpoint(cfg.run_dir + "/ckpt", step + 1, ddp, cfg, optimizer, scheduler)
    params = [p.detach().clone() for p in model.parameters()]
    return losses, params, optimizer


def _worker(rank, world_size, root, out_file):
    from dense_model.parallel import initialize_parallel_from
    from dense_model.testing import random_lm_batches
    from dense_model.training.optim import torch_adams

    results = {}
    for fused in (False, True):
        cfg = _config(f"{root}/{fused}", fused)
        initialize_parallel_from(cfg.parallel, cfg.training.seed)
        batches = random_lm_batches(STEPS, 2, cfg.model.seq_length, cfg.model.vocab_size)
        losses, params, optimizer = _train(cfg, batches, 0, STEPS, save=SAVED_AT)
        adams = torch_adams(optimizer)
        results[fused] = {
            "losses": losses,
            "params": params,
            "fused_flags": [g["fused"] for opt in adams for g in opt.param_groups],
            "step_dtypes": {str(s["step"].dtype) for opt in adams for s in opt.state.values()},
        }
    for saved in (False, True):  # resume each run's checkpoint with each setting
        for fused in (False, True):
            cfg = _config(f"{root}/resume_{saved}_{fused}", fused)
            initialize_parallel_from(cfg.parallel, cfg.training.seed)
            batches = random_lm_batches(STEPS, 2, cfg.model.seq_length, cfg.model.vocab_size)
            ckpt = f"{root}/{saved}/ckpt"
            losses, params, optimizer = _train(cfg, batches, SAVED_AT, STEPS, load=ckpt)
            results[(saved, fused)] = {
                "losses": losses,
                "params": params,
                "fused_flags": [g["fused"] for opt in torch_adams(optimizer) for g in opt.param_groups],
                "steps": sorted(
                    {float(s["step"]) for opt in torch_adams(optimizer) for s in opt.state.values()}
                ),
            }
    torch.save(results, out_file)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused_adam")
    out = root / "results.pt"
    spawn_workers(_worker, 1, str(root), str(out))
    return torch.load(out, weights_only=False)


def test_fused_adamw_equals_the_foreach_step_to_fp32_rounding(runs):
    plain, fused = runs[False], runs[True]
    assert set(plain["fused_flags"]) == {None}  # torch's default: the foreach/for-loop path
    assert set(fused["fused_flags"]) == {True}
    assert fused["step_dtypes"] == {"torch.float32"}
    assert fused["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    for a, b in zip(fused["params"], plain["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_adamw_resumes_bitwise_and_checkpoints_load_both_ways(runs):
    for saved in (False, True):
        full = runs[saved]
        for fused in (False, True):
            resumed = runs[(saved, fused)]
            assert set(resumed["fused_flags"]) == {True if fused else None}, (saved, fused)
            assert resumed["steps"] == [float(STEPS)], (saved, fused)  # Adam's step counter restored
            if saved == fused:  # the same optimizer: exact resume
                assert resumed["losses"] == full["losses"][SAVED_AT:], (saved, fused)
                for a, b in zip(resumed["params"], full["params"], strict=True):
                    assert torch.equal(a, b), (saved, fused)
            else:  # the other kernel from the loaded state: fp32 rounding
                assert resumed["losses"] == pytest.approx(full["losses"][SAVED_AT:], rel=1e-5)
                for a, b in zip(resumed["params"], full["params"], strict=True):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
