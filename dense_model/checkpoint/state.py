"""Saving and loading the training state with megatron-core ``dist_checkpointing``: saved at one
TP/PP layout, loadable at any.

A checkpoint is written to ``iter_NNNNNNN.tmp`` and renamed into place only when every rank has
finished; ``latest_checkpointed_iteration.txt`` moves (write + fsync + rename) after that. A save
killed midway therefore leaves the previous checkpoint and the pointer to it untouched; the
leftover ``.tmp`` folder is removed by the next save.

The sharded state holds the model (PolyCom scalars included), the optimizer, and, as common state
saved once, the iteration, the scheduler, the consumed samples and the config; per-rank RNG states
are ``ShardedObject``s (restored when the layout is unchanged).

megatron-core is imported inside the functions: importing it costs seconds and prints warnings that
``dense_model.compat.quiet`` filters only once a job has started.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from dense_model import collectives
from dense_model.checkpoint.layout import iteration_dir, publish, resolve_checkpoint, write_metadata

# The distributed optimizer's state in a layout any TP/PP/DP can load (megatron-core 0.16 refuses
# its default "fully_sharded_model_space" format: flattened_range is no longer supported).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def _rank() -> int:
    return collectives.rank()


def _barrier() -> None:
    collectives.barrier()


def _rng_state_object():
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {
        "python_torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject(
        "rng_state",
        state,
        (
            ps.get_pipeline_model_parallel_world_size(),
            ps.get_tensor_model_parallel_world_size(),
            ps.get_data_parallel_world_size(),
        ),
        (
            ps.get_pipeline_model_parallel_rank(),
            ps.get_tensor_model_parallel_rank(),
            ps.get_data_parallel_rank(),
        ),
        replica_id=0,
    )


def _layout() -> list[int]:
    from megatron.core import parallel_state as ps

    return [
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_world_size(),
    ]


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def save_checkpoint(
    root: str | os.PathLike,
    iteration: int,
    model,
    cfg,
    optimizer=None,
    scheduler=None,
    extra: dict | None = None,
    keep_last: int | None = None,
    fully_parallel: bool = False,
) -> Path:
    """Save on every rank (collective). Returns the final iteration folder."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob("iter_*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir()
    _barrier()

    finish_param_gather(model)
    model_state = _unwrap(model).sharded_state_dict()
    state = {
        "model": model_state,
        "iteration": iteration,
        "layout": _layout(),
        "rng_state": _rng_state_object(),
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_state, metadata=OPTIMIZER_METADATA)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    state.update(extra or {})
    dist_checkpointing.save(state, str(tmp), sharded_strategy=_save_strategy(fully_parallel))
    _barrier()

    if _rank() == 0:
        write_metadata(tmp, iteration, cfg)
        publish(tmp, final, root, iteration, keep_last)
    _barrier()
    return final


def finish_param_gather(model) -> None:
    """Complete the all-gather of updated parameters that overlap_param_gather defers.

    With the distributed optimizer and ``overlap_param_gather``, ``optimizer.step()`` updates only
    this rank's shard and the all-gather runs inside the next forward; a save before that forward
    would write partly one-step-old weights. As Megatron-LM does before it saves: take the forward
    pre-hooks off with a synchronous gather, then put them back.
    """
    if getattr(model, "use_forward_hook", False):
        model.disable_forward_pre_hook(param_sync=True)
        model.enable_forward_pre_hook()


def _save_strategy(fully_parallel: bool):
    """Fully parallel save: each data-parallel replica writes a share of the replicated tensors."""
    if not fully_parallel or not dist.is_initialized():
        return None
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    if ps.get_data_parallel_world_size() == 1:
        return None
    return FullyParallelSaveStrategyWrapper(
        get_default_save_sharded_strategy(), ps.get_data_parallel_group(with_context_parallel=True)
    )


def load_checkpoint(
    folder: str | os.PathLike, model, optimizer=None, scheduler=None, load_rng: bool = True
) -> dict:
    """Load into an already-built model (any TP/PP layout). Returns the common state
    (iteration, consumed samples, ...)."""
    from megatron.core import dist_checkpointing

    folder = resolve_checkpoint(folder)
    common = dist_checkpointing.load_common_state_dict(str(folder))
    same_layout = common.get("layout") == _layout()
    model_state = _unwrap(model).sharded_state_dict()
    request = {"model": model_state}
    if optimizer is not None:
        prepare_optimizer_for_load(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=True, metadata=OPTIMIZER_METADATA
        )
    if load_rng and same_layout:
        request["rng_state"] = _rng_state_object()
    loaded = dist_checkpointing.load(request, str(folder))
    _unwrap(model).load_state_dict(loaded["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        finish_optimizer_load(optimizer)
    if scheduler is not None and "scheduler" in loaded:
        scheduler.load_state_dict(loaded["scheduler"])
    if "rng_state" in request:
        _restore_rng(loaded["rng_state"])
    return loaded


def _restore_rng(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["python_torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


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
