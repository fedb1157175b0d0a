"""megatron-core's gradient norm, clipping and Adam step with our foreach ops against torch's own
(get_total_norm, clip_grad_norm_, AdamW), over a real 2-process gloo group; and the host reads
(syncs on a GPU) the norm makes: one, where megatron-core's fallback makes one per tensor."""

import pytest
import torch

from dense_model.testing import spawn_workers

SHAPES = [(33, 7), (64,), (5, 5, 3), (1,), (128, 9)]


def _grads(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(shape, generator=gen) * (1 + i) for i, shape in enumerate(SHAPES)]


def _norm_worker(rank, world_size, out_file):
    import torch.distributed as dist
    from megatron.core.optimizer import clip_grads

    from dense_model.compat import enable_cpu_mode
    from dense_model.compat.multi_tensor import HostReads, install

    enable_cpu_mode()  # megatron's clip_grads allocates its flag buffer on "cuda"
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    grads = _grads(rank)
    with HostReads() as fallback_reads:
        fallback = clip_grads.get_grad_norm_fp32(grads, grad_stats_parallel_group=dist.group.WORLD)
    assert install()
    with HostReads() as reads:
        norm = clip_grads.get_grad_norm_fp32(grads, grad_stats_parallel_group=dist.group.WORLD)

    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=norm)
    if rank == 0:
        torch.save(
            {
                "norm": norm,
                "fallback": fallback,
                "reads": reads.count,
                "fallback_reads": fallback_reads.count,
                "clipped": [p.grad for p in params],
            },
            out_file,
        )


def test_grad_norm_and_clip_match_torch_over_two_ranks_with_one_host_read(tmp_path):
    out = tmp_path / "norm.pt"
    spawn_workers(_norm_worker, 2, str(out))
    got = torch.load(out)
    every_grad = _grads(0) + _grads(1)  # the norm over both ranks' shards (a TP=2 model)
    expected = torch.nn.utils.get_total_norm(every_grad).item()
    assert got["norm"] == pytest.approx(expected, rel=1e-6)
    assert got["fallback"] == pytest.approx(expected, rel=1e-6)
    assert got["reads"] == 1  # the total, read once by megatron's get_grad_norm_fp32
    assert got["fallback_reads"] == len(SHAPES) + 2  # one per tensor, then two for the total

    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in every_grad]
    for p, g in zip(params, every_grad, strict=True):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
    for ours, ref in zip(got["clipped"], [p.grad for p in params[: len(SHAPES)]], strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)


def _adam_worker(rank, world_size, out_file):
    from dense_model.config import load_config
    from dense_model.parallel import initialize_parallel
    from dense_model.testing import tiny_model_overrides
    from dense_model.training.optim import build_scheduler, build_training_model

    initialize_parallel(1, 1, seed=5)
    cfg = load_config(
        None,
        [
            *tiny_model_overrides(layers=1),
            "training.lr=1e-2",
            "training.weight_decay=0.1",
            "training.clip_grad=0.5",
            "training.adam_beta1=0.9",
            "training.adam_beta2=0.95",
            "training.adam_eps=1e-8",
            "training.lr_warmup_iters=0",
            "training.lr_decay_style=constant",
            "training.train_iters=3",
            "parallel.use_distributed_optimizer=false",
        ],
    )
    model, ddp, optimizer = build_training_model(cfg)
    scheduler = build_scheduler(optimizer, cfg)  # sets each group's weight decay (wd_mult) as in training
    gen = torch.Generator().manual_seed(3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {}
    for _ in range(3):  # three steps: Adam's moments and bias correction take part
        optimizer.zero_grad()
        for name, p in model.named_parameters():
            g = torch.randn(p.shape, generator=gen)
            p.main_grad.copy_(g)
            grads.setdefault(name, []).append(g)
        applied, norm, _ = optimizer.step()
        assert applied
        scheduler.step(1)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    no_decay = {n for n, p in model.named_parameters() if p.ndim == 1 or n.endswith(".bias")}
    torch.save({"before": before, "after": after, "grads": grads, "no_decay": no_decay}, out_file)


def test_adam_step_matches_torch_adamw(tmp_path):
    """Our optimizer and schedule (megatron-core's, as the trainer builds them, with the foreach ops
    in the clipping) against torch.optim.AdamW with megatron's groups: no decay on 1-D params."""
    out = tmp_path / "adam.pt"
    spawn_workers(_adam_worker, 1, str(out))
    got = torch.load(out)
    names = list(got["before"])
    params = {n: torch.nn.Parameter(got["before"][n].clone()) for n in names}
    reference = torch.optim.AdamW(
        [
            {"params": [params[n] for n in names if n not in got["no_decay"]], "weight_decay": 0.1},
            {"params": [params[n] for n in names if n in got["no_decay"]], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    for step in range(3):
        for n in names:
            params[n].grad = got["grads"][n][step].clone()
        torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm=0.5)
        reference.step()
    for n in names:
        assert not torch.equal(got["after"][n], got["before"][n]), n
        torch.testing.assert_close(got["after"][n], params[n].detach(), rtol=1e-5, atol=1e-6, msg=n)
