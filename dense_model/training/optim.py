"""Optimizer, LR schedule and data-parallel wrapper from megatron-core, configured from our config.

AdamW through ``get_megatron_optimizer`` (no weight decay on 1-D parameters and biases: norms and
the PolyCom scalars), optionally the distributed optimizer; ``OptimizerParamScheduler`` for linear
warmup then cosine (or linear/constant) decay to ``min_lr``; megatron ``DistributedDataParallel``.
"""

from __future__ import annotations

import torch


def build_training_model(cfg):
    """(model, ddp, optimizer) for this rank, wired the way megatron-core's schedules expect.

    The GPTModel, wrapped in megatron's Float16Module for bf16 (bf16 weights, fp32 main params in
    the optimizer), then DistributedDataParallel; the optimizer; and the config hooks the pipeline
    schedules call (no_sync for gradient accumulation, finalize_model_grads for the DP reduce,
    grad_scale_func). Used by the trainer and by scripts/bench_train_step.py.
    """
    from megatron.core.distributed import finalize_model_grads

    from dense_model.model import build_model

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


def wrap_ddp(model, cfg):
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


def build_optimizer(model_chunks, cfg):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

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
    return get_megatron_optimizer(opt_config, model_chunks)


def prepare_optimizer_for_load(optimizer) -> None:
    """Work around megatron-core 0.16.1's distributed optimizer load without Apex/TE.

    There, torch's Adam keeps a per-parameter "step": ``DistributedOptimizer.state_dict()`` reads it
    from every state (but a fresh optimizer has none), and the fully-reshardable loader copies
    every state key from the checkpoint except "step" (KeyError). We give a fresh optimizer its
    state tensors, step included, and let the loader copy "step" onto itself; the real step is
    restored from the checkpoint's param groups. A no-op with Apex/TE (fused Adam, no "step").
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param.data)
                    state["exp_avg_sq"] = torch.zeros_like(param.data)
        setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if setter is None or getattr(setter, "_keeps_step", False):
            continue

        def keep_step(model_param, tensors, _setter=setter, _opt=opt):
            if "step" not in tensors:
                group_index, order = _opt.model_param_group_index_map[model_param]
                main = _opt.optimizer.param_groups[group_index]["params"][order]
                if "step" in _opt.optimizer.state[main]:
                    tensors = {**tensors, "step": _opt.optimizer.state[main]["step"]}
            return _setter(model_param, tensors)

        keep_step._keeps_step = True
        opt._set_main_param_and_optimizer_states = keep_step


def finish_optimizer_load(optimizer) -> None:
    """After a load without Apex/TE: megatron-core gives every torch-Adam state the *same* "step"
    tensor, which torch then increments in place once per parameter; give each its own copy."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            for state in inner.state.values():
                if "step" in state:
                    state["step"] = state["step"].detach().clone()


def schedule_steps(cfg) -> tuple[int, int]:
    """(train_iters, warmup_iters) from steps or tokens."""
    from dense_model.config import train_and_warmup_steps

    iters, warmup = train_and_warmup_steps(cfg)
    return iters, min(warmup, iters)


def build_scheduler(optimizer, cfg):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    iters, warmup = schedule_steps(cfg)
    t = cfg.training
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=iters,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=iters,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
