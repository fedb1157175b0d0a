"""Optimizer, LR schedule and data-parallel wrapper from megatron-core, configured from our config.

AdamW through ``get_megatron_optimizer`` (no weight decay on 1-D parameters and biases: norms and
the PolyCom scalars; or, ``training.weight_decay_on=all``, on everything but the PolyCom scalars), optionally the distributed optimizer; without TE/apex its gradient norm and
scale run on torch's foreach kernels (``dense_model.compat.multi_tensor``) and its Adam update on
torch's fused AdamW kernel (``set_fused_adam``: megatron-core builds ``torch.optim.AdamW`` without
``fused=True``, i.e. the foreach path, ~8 passes over the fp32 state); ``OptimizerParamScheduler``
for linear warmup then cosine (or linear/constant) decay to ``min_lr``; megatron ``DistributedDataParallel``.

The schedule is a function of the step and the config (megatron-core's formula: linear warmup from
0, or ``lr_warmup_init`` x lr, over the warm-up steps to ``lr``, then the decay style down to
``min_lr`` at ``train_iters``; with ``training.lr_decay_tokens`` OLMo's in tokens, ``schedule_class``). A
resumed job takes the step from the checkpoint and everything else from its own config
(``adopt_schedule``): a changed ``lr``, ``min_lr``, warm-up, decay style, length (in steps or
``lr_decay_tokens``), weight decay or
Adam betas/epsilon applies from the next step, as the new formula's value at that step (no restart
of the warm-up, no rescaling), and the change is returned for the job to say and record.
"""

from __future__ import annotations

import functools
import math

import torch

from dense_model.config import Config, train_and_warmup_steps, warmup_tokens
from dense_model.model import build_model


def build_training_model(cfg: Config):
    """(model, ddp, optimizer) for this rank, wired the way megatron-core's schedules expect.

    The GPTModel, wrapped in megatron's Float16Module for bf16 (bf16 weights, fp32 main params in
    the optimizer), then DistributedDataParallel; the optimizer; and the config hooks the pipeline
    schedules call (no_sync for gradient accumulation, finalize_model_grads for the DP reduce,
    grad_scale_func). Used by the trainer and by scripts/bench_train_step.py.
    """
    from megatron.core.distributed import finalize_model_grads

    model = build_model(cfg)
    wrapped = model
    if model.config.bf16:
        from megatron.core.transformer.module import Float16Module

        wrapped = Float16Module(model.config, model)
    ddp = wrap_ddp(wrapped, cfg)
    optimizer = build_optimizer([ddp], cfg)
    model.config.no_sync_func = ddp.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.grad_scale_func = optimizer.scale_loss
    return model, ddp, optimizer


def wrap_ddp(model, cfg: Config):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # we check the loss and grad norm ourselves (nan_policy)
        bucket_size=None,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_optimizer(model_chunks, cfg: Config):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from dense_model.compat import multi_tensor

    multi_tensor.install()  # the gradient norm without a host sync per tensor (no TE/apex)

    t = cfg.training
    bf16 = bool(model_chunks[0].config.bf16)
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(opt_config, model_chunks, config_overrides=weight_decay_overrides(cfg))
    set_fused_adam(optimizer, t.fused_adam)
    return optimizer


def weight_decay_overrides(cfg: Config):
    """megatron-core's param-group overrides for ``training.weight_decay_on``.

    ``matrices``: None, megatron-core's default (wd_mult 0 for 1-D parameters and biases: norms,
    PolyCom scalars). ``all``: OLMo's ``decay_norm_and_bias`` + ``decay_embeddings`` (the seed's MoE
    run): every parameter decays but the activation's coefficients (OLMo's get_param_groups never
    decays an Activation's parameters), which are the only ones with wd_mult 0.
    """
    if cfg.training.weight_decay_on == "matrices":
        return None
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    polycom = ParamWithNamePredicate(
        name="activation_coefficients", fn=lambda param, name: ".activation_func." in name
    )
    return {ParamKey(with_name_predicate=polycom): {"wd_mult": 0.0}}  # a ParamGroupOverride


def torch_adams(optimizer) -> list:
    """The torch Adam/AdamW instances inside a megatron optimizer (chained or not): none when
    megatron-core uses TE's or apex's FusedAdam."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    inner = [getattr(sub, "optimizer", sub) for sub in subs]
    return [opt for opt in inner if isinstance(opt, torch.optim.Adam | torch.optim.AdamW)]


def fused_adam_wanted(setting, devices: set[str]) -> bool:
    """Whether ``training.fused_adam`` (auto, true, false) asks for torch's fused kernel on these
    parameter devices: auto = on CUDA only (the CPU keeps the foreach/for-loop path its golden
    losses were recorded with); true = wherever this torch has the kernel, else a ValueError."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    if setting is False or not devices:
        return False
    if setting == "auto":
        return devices == {"cuda"}
    missing = devices - set(_get_fused_kernels_supported_devices())
    if missing:
        raise ValueError(
            f"training.fused_adam=true: torch {torch.__version__} has no fused AdamW for "
            f"{sorted(missing)} parameters; set training.fused_adam=auto"
        )
    return True


def set_fused_adam(optimizer, setting="auto") -> bool:
    """Switch the torch AdamW inside ``optimizer`` to its fused kernel (or back); returns whether
    it is fused. Same update as the foreach path up to fp32 rounding; its step counters live on
    the parameters' device as fp32 (the foreach path keeps them on the host).

    A checkpoint saves the param groups' ``fused`` flag and torch's ``load_state_dict`` would put
    the saved one back; a load hook re-applies this optimizer's choice and moves the step counters,
    so checkpoints load both ways (fused <-> unfused)."""
    adams = torch_adams(optimizer)
    devices = {p.device.type for opt in adams for g in opt.param_groups for p in g["params"]}
    fused = fused_adam_wanted(setting, devices)
    for opt in adams:
        _apply_fused(opt, fused)
        if not getattr(opt, "_dense_model_fused_hook", False):
            opt.register_load_state_dict_post_hook(lambda o: _apply_fused(o, o._dense_model_fused))
            opt._dense_model_fused_hook = True
    return fused


def _apply_fused(opt, fused: bool) -> None:
    opt._dense_model_fused = fused
    opt.defaults["fused"] = fused or None
    for group in opt.param_groups:
        group["fused"] = fused or None  # None: torch's default (foreach where it can)
        group["foreach"] = None
        for param in group["params"]:
            state = opt.state.get(param, {})
            if "step" in state:  # where torch keeps it: fused on the device, else a host scalar
                device = param.device if fused else torch.device("cpu")
                state["step"] = state["step"].detach().to(device=device, dtype=torch.float32).clone()


def schedule_steps(cfg: Config) -> tuple[int, int]:
    """(train_iters, warmup_iters) from steps or tokens."""
    iters, warmup = train_and_warmup_steps(cfg)
    return iters, min(warmup, iters)


def build_scheduler(optimizer, cfg: Config):
    iters, warmup = schedule_steps(cfg)
    t = cfg.training
    return schedule_class()(
        optimizer,
        warmup_init=t.lr_warmup_init,
        tokens_per_step=t.global_batch_size * cfg.model.seq_length,
        warmup_tokens=warmup_tokens(cfg),
        decay_tokens=t.lr_decay_tokens,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=iters,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=iters,
        wd_incr_style="constant",
        # The config's values, never the checkpoint's: only the step comes from a checkpoint
        # (megatron-core's use_checkpoint_opt_param_scheduler would silently keep the old schedule).
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


@functools.cache
def schedule_class():
    """megatron-core's OptimizerParamScheduler, its warm-up from ``warmup_init`` x lr (its init_lr),
    and with ``decay_tokens`` (training.lr_decay_tokens) OLMo's schedule in tokens instead of its own
    in steps (a class made on first use: megatron-core is imported only when a scheduler is built).

    OLMo's (BryceZhuo/PolyCom moe_model/olmo/optim.py, ``CosWithWarmup``/``LinearWithWarmup``/
    ``ConstantWithWarmupScheduler``, with ``units: tokens``): at T tokens, linear from warmup_init x
    lr to lr while T < warm-up tokens; then the decay from lr to min_lr over the tokens between the
    warm-up and ``decay_tokens`` (OLMo's t_max, which need not be the training length); min_lr from
    ``decay_tokens`` on. OLMo's trainer counts a step's tokens before the step, so step k (1-based)
    trains at T = k x tokens per step; here ``num_steps`` is the steps done (k - 1 during step k).
    megatron-core's formula cannot say this: its lengths are in whole steps (5T tokens is 1,192,092.9
    steps of 4M tokens) and step k trains at k - 1 steps.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class Schedule(OptimizerParamScheduler):
        def __init__(self, optimizer, *, warmup_init, tokens_per_step, warmup_tokens, decay_tokens, **kwargs):
            self.warmup_init = float(warmup_init)
            self.tokens_per_step = int(tokens_per_step)
            self.warmup_tokens = int(warmup_tokens)
            self.decay_tokens = decay_tokens
            super().__init__(optimizer, init_lr=self.warmup_init * kwargs["max_lr"], **kwargs)  # calls get_lr

        def get_lr(self, param_group: dict) -> float:
            if self.decay_tokens is None:
                return super().get_lr(param_group)
            # the step's tokens counted once its batch is in (OLMo's trainer counts them before the step)
            return self.lr_at((self.num_steps + 1) * self.tokens_per_step, param_group)

        def lr_at(self, tokens: int, param_group: dict | None = None) -> float:
            """The token schedule's learning rate at ``tokens`` (for ``param_group``'s max/min lr)."""
            max_lr = (param_group or {}).get("max_lr", self.max_lr)
            min_lr = (param_group or {}).get("min_lr", self.min_lr)
            if tokens < self.warmup_tokens:
                start = self.warmup_init * max_lr
                return start + (max_lr - start) * tokens / self.warmup_tokens
            if self.lr_decay_style == "constant":
                return max_lr
            if tokens >= self.decay_tokens:
                return min_lr
            ratio = (tokens - self.warmup_tokens) / (self.decay_tokens - self.warmup_tokens)
            if self.lr_decay_style == "linear":
                return max_lr - (max_lr - min_lr) * ratio
            return min_lr + (max_lr - min_lr) * (1 + math.cos(math.pi * ratio)) / 2

        def state_dict(self) -> dict:
            return {
                **super().state_dict(),
                "lr_warmup_init": self.warmup_init,
                # None for megatron-core's schedule in steps (its warm-up is lr_warmup_steps)
                "lr_warmup_tokens": None if self.decay_tokens is None else self.warmup_tokens,
                "lr_decay_tokens": self.decay_tokens,
            }

    return Schedule


# Param-group settings that come from the config (the scheduler sets lr and weight_decay from them
# at every step); torch's load_state_dict puts the checkpoint's back, adopt_schedule undoes that.
_GROUP_SETTINGS = ("max_lr", "min_lr", "betas", "eps")


def group_settings(optimizer) -> list[dict]:
    """The config's settings in each param group of a just-built optimizer (before a load)."""
    return [{k: g[k] for k in _GROUP_SETTINGS if k in g} for g in optimizer.param_groups]


def schedule_values(scheduler_state: dict, group: dict) -> dict:
    """The schedule as the config names it, from a scheduler state dict (megatron-core's) and one
    optimizer param group: lr, min_lr, lr_decay_style, warmup_steps, train_steps, lr_warmup_init,
    warmup_tokens and lr_decay_tokens (None for a schedule in steps, and in a checkpoint from before
    they were saved), weight_decay, adam_beta1, adam_beta2, adam_eps."""
    beta1, beta2 = group["betas"]
    return {
        "lr": float(scheduler_state["max_lr"]),
        "min_lr": float(scheduler_state["min_lr"]),
        "lr_decay_style": scheduler_state["lr_decay_style"],
        "warmup_steps": int(scheduler_state["lr_warmup_steps"]),
        "train_steps": int(scheduler_state["lr_decay_steps"]),
        "lr_warmup_init": float(scheduler_state.get("lr_warmup_init", 0.0)),
        "warmup_tokens": scheduler_state.get("lr_warmup_tokens"),
        "lr_decay_tokens": scheduler_state.get("lr_decay_tokens"),
        "weight_decay": float(scheduler_state["end_wd"]),
        "adam_beta1": float(beta1),
        "adam_beta2": float(beta2),
        "adam_eps": float(group["eps"]),
    }


def schedule_in_force(optimizer, scheduler) -> dict:
    """The schedule this job trains with, and its step (what a checkpoint's metadata records)."""
    return {**schedule_values(scheduler.state_dict(), optimizer.param_groups[0]), "step": scheduler.num_steps}


def adopt_schedule(optimizer, scheduler, saved_scheduler: dict | None, settings: list[dict]) -> dict:
    """After a resume's load: the config's schedule (``settings`` from ``group_settings`` before the
    load; the scheduler built with the config's values) at the checkpoint's step. Returns
    {name: [checkpoint's, config's]} for each value of ``schedule_values`` that changed (none
    reported for a checkpoint without a scheduler state)."""
    saved = saved_scheduler or scheduler.state_dict()
    old = schedule_values(saved, optimizer.param_groups[0])  # the checkpoint's param groups now
    for group, own in zip(optimizer.param_groups, settings, strict=True):
        group.update(own)
    scheduler.step(0)  # lr and weight decay of every group from the config's formula at this step
    new = schedule_values(scheduler.state_dict(), optimizer.param_groups[0])
    return {name: [old[name], new[name]] for name in old if old[name] != new[name]}
