"""The learning-rate schedule of the seed's MoE run (OLMo's cosine with warm-up, in tokens) and of the
dense 1B run (megatron-core's, in steps), as ``training.optim.build_scheduler`` builds them from the
configs: megatron-core's OptimizerParamScheduler (and our token schedule on it) stepping a real torch
optimizer's param groups, against the formulas re-implemented here in float64. No process group."""

import math

import pytest
import torch

from dense_model.config import ConfigError, load_config, validate
from dense_model.training.optim import adopt_schedule, build_scheduler, group_settings

OLMOE = "configs/moe/olmoe_1b7b.yaml"
TOKENS_PER_STEP = 1024 * 4096


def seed_lr(tokens, lr=4.0e-4, t_warmup=10_485_760_000, t_max=5e12, alpha_f=0.1, warmup_min_lr=None):
    """The seed's LR at ``tokens`` tokens, re-implemented from BryceZhuo/PolyCom
    moe_model/olmo/optim.py: ``CosWithWarmup.get_lr`` with ``Scheduler._linear_warmup`` (warmup_min_lr
    unset: 0.1 x lr), called by ``Trainer.train_step`` (moe_model/olmo/train.py) as
    ``get_lr(learning_rate, scheduler_current, scheduler_max)`` with units tokens: the tokens seen,
    counted before the step. The seed's config OLMoE-1B-7B-0924_PolyNorm.yml: learning_rate 4e-4,
    t_warmup 10485760000, t_max 5e12, alpha_f 0.1."""
    lr, tokens, t_warmup, t_max = (float(x) for x in (lr, tokens, t_warmup, t_max))
    eta_min = lr * alpha_f
    if tokens < t_warmup:
        start = warmup_min_lr if warmup_min_lr is not None else lr * 0.10
        return start + (lr - start) * min(tokens, t_warmup) / t_warmup
    if tokens >= t_max:
        return eta_min
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * (tokens - t_warmup) / (t_max - t_warmup))) / 2


def scheduler_for(cfg):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    return optimizer, build_scheduler(optimizer, cfg)


def lr_of_step(scheduler, optimizer, k):
    """The LR step k (1-based) trains with: the trainer steps the scheduler once per step after it."""
    scheduler.step(k - 1 - scheduler.num_steps)
    return optimizer.param_groups[0]["lr"]


def test_olmoe_schedule_is_the_seeds_cosine_with_warmup_in_tokens():
    cfg = load_config(OLMOE)
    t = cfg.training
    assert (t.lr, t.min_lr, t.lr_warmup_init) == (4.0e-4, 4.0e-5, 0.1)
    assert (t.lr_warmup_tokens, t.lr_decay_tokens) == (10_485_760_000, 5_000_000_000_000)
    assert t.global_batch_size * cfg.model.seq_length == TOKENS_PER_STEP
    optimizer, scheduler = scheduler_for(cfg)
    points = {
        "start": 0,
        "mid-warm-up": 5_242_880_000,
        "end of warm-up": 10_485_760_000,
        "200B": 200_000_000_000,
        "t_max": 5_000_000_000_000,
        "past t_max": 6_000_000_000_000,
    }
    for name, tokens in points.items():
        assert scheduler.lr_at(tokens) == pytest.approx(seed_lr(tokens), rel=1e-12, abs=0), name
    assert scheduler.lr_at(0) == pytest.approx(4.0e-5, rel=1e-12)  # from 0.1 x lr, not from 0
    # 200B tokens, where training stops: the cosine over 5T has decayed 0.3% from the peak
    assert scheduler.lr_at(200_000_000_000) == pytest.approx(3.9872e-4, rel=1e-4)
    # The steps the job takes: step k at k x 4,194,304 tokens (OLMo counts the batch before the step).
    for k in (1, 2, 1250, 2499, 2500, 2501, 47_684, 1_192_092, 1_192_093):
        assert lr_of_step(scheduler, optimizer, k) == pytest.approx(
            seed_lr(k * TOKENS_PER_STEP), rel=1e-12, abs=0
        ), k
    assert lr_of_step(scheduler, optimizer, 1_192_093) == pytest.approx(4.0e-5, rel=1e-12)  # past 5T


def megatron_lr(n, lr, min_lr, warmup, train_steps):
    """megatron-core's OptimizerParamScheduler.get_lr after n steps (init_lr 0, cosine)."""
    if n <= warmup:
        return lr * n / warmup
    if n > train_steps:
        return min_lr
    return min_lr + 0.5 * (math.cos(math.pi * (n - warmup) / (train_steps - warmup)) + 1.0) * (lr - min_lr)


def test_dense_1b_schedule_stays_megatrons_in_steps():
    """The seed's dense run (Megatron-LM): warm-up from 0 over 620M tokens = 2366 steps of 262,144,
    cosine to 3e-5 over the 381,469 steps of 100B tokens; step k trains at k - 1 steps."""
    cfg = load_config("configs/1b/polynorm.yaml")
    assert cfg.training.lr_decay_tokens is None and cfg.training.lr_warmup_init == 0.0
    optimizer, scheduler = scheduler_for(cfg)
    for k in (1, 2, 1000, 2366, 2367, 2368, 200_000, 381_469, 381_470):
        expected = megatron_lr(k - 1, 3.0e-4, 3.0e-5, 2366, 381_469)
        assert lr_of_step(scheduler, optimizer, k) == pytest.approx(expected, rel=1e-12, abs=0), k


def test_a_changed_t_max_on_relaunch_is_applied_and_reported():
    """adopt_schedule (what a resumed job runs after loading): the checkpoint's scheduler state from
    a 5T-token schedule, the config's 2T one; the change is reported and the new formula applies at
    the checkpoint's step. A checkpoint from before these fields were saved reports no change."""
    old_cfg = load_config(OLMOE)
    new_cfg = load_config(OLMOE, ["training.lr_decay_tokens=2000000000000", "training.lr_warmup_init=0.2"])
    optimizer, old = scheduler_for(old_cfg)
    old.step(10_000)
    saved = old.state_dict()
    _, new = scheduler_for(new_cfg)
    settings = group_settings(optimizer)
    new.optimizer = optimizer
    new.load_state_dict(saved)
    changes = adopt_schedule(optimizer, new, saved, settings)
    assert changes == {
        "lr_warmup_init": [0.1, 0.2],
        "lr_decay_tokens": [5_000_000_000_000, 2_000_000_000_000],
    }
    assert optimizer.param_groups[0]["lr"] == pytest.approx(
        seed_lr(10_001 * TOKENS_PER_STEP, t_max=2e12, warmup_min_lr=0.2 * 4e-4), rel=1e-12
    )
    dense_optimizer, dense = scheduler_for(load_config("configs/1b/polynorm.yaml"))
    older = {
        k: v
        for k, v in dense.state_dict().items()
        if k not in ("lr_warmup_init", "lr_warmup_tokens", "lr_decay_tokens")
    }
    settings = group_settings(dense_optimizer)
    assert adopt_schedule(dense_optimizer, dense, older, settings) == {}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["training.lr_warmup_init=1.0"], "training.lr_warmup_init must be in [0, 1)"),
        (["training.lr_decay_tokens=0"], "training.lr_decay_tokens must be a finite number > 0"),
        (
            ["training.lr_decay_tokens=10485760000"],
            "training.lr_decay_tokens=10485760000 is not longer than the warm-up (10485760000 tokens",
        ),
    ],
)
def test_bad_token_schedule_values_name_the_field(overrides, message):
    cfg = load_config(OLMOE, overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, files=False)
    assert str(err.value).startswith(message), str(err.value)
