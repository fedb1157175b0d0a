"""Saving and loading the training state with megatron-core ``dist_checkpointing``: the model
saved at one TP/PP/EP layout loads at any, the optimizer as its format allows (below).

A checkpoint is written to ``iter_NNNNNNN.tmp`` and renamed into place only when every rank has
finished; ``latest_checkpointed_iteration.txt`` moves (write + fsync + rename) after that. A save
killed midway therefore leaves the previous checkpoint and the pointer to it untouched; the
leftover ``.tmp`` folder is removed by the next save.

The sharded state holds the model (PolyCom scalars included), the optimizer, and, as common state
saved once, the iteration, the scheduler, the consumed samples, the parallel layout and the config;
per-rank RNG states are ``ShardedObject``s (restored when the layout is unchanged).

The distributed optimizer's state is written in ``checkpoint.optimizer_format`` (megatron-core's
names, recorded as the checkpoint's content metadata):

- ``dp_reshardable`` (default, as Megatron-LM's): every rank writes its own flat shard, nothing is
  gathered; loads at another DP size, but only at the same TP/PP/EP (checked, with the fix named).
- ``fully_reshardable``: the shards are gathered into per-parameter tensors on every rank of the
  DP group before the save; loads at any layout.

Each load decides from the saved layout: unchanged, ranks share the reading (megatron-core's fully
parallel load) and exchange what they read; changed, every rank reads what it needs itself.
A checkpoint saved at EP>1 holds the optimizer as one state per chained optimizer (dense, experts)
and one at EP=1 (experts are dense there): the param groups are regrouped on load.

megatron-core is imported inside the functions: importing it costs seconds and prints warnings that
``dense_model.compat.quiet`` filters only once a job has started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from dense_model import collectives
from dense_model.checkpoint.layout import (
    CheckpointError,
    disk_full_message,
    folder_bytes,
    fsync_tree,
    is_disk_full,
    iteration_dir,
    publish,
    read_metadata,
    resolve_checkpoint,
    write_metadata,
)

# What a distributed optimizer requests from a checkpoint that names no format: one written before
# the format was a setting, or by a non-distributed optimizer (per-parameter tensors either way).
# (megatron-core 0.16 refuses its own default, "fully_sharded_model_space": no flattened_range.)
RESHARDABLE_FORMAT = "fully_reshardable"
# Layout entries (see _layout) a dp_reshardable optimizer state must find unchanged: all but DP.
_DP = 2


def optimizer_metadata(optimizer, optimizer_format: str) -> dict:
    """The ``metadata`` megatron-core's ``sharded_state_dict`` takes; also saved as content metadata.
    Without the chained-optimizer prefix, per-parameter state keys do not depend on EP; the format
    is named only for a distributed optimizer (megatron's ChainedOptimizer prefixes every chained
    optimizer's keys when a non-reshardable one is named, distributed or not)."""
    metadata = {"chained_optim_avoid_prefix": True}
    if _is_distributed(optimizer):
        metadata["distrib_optim_sharding_type"] = optimizer_format
    return metadata


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
    """[PP, TP, DP, EP, expert TP] of this job (checkpoints before EP was recorded hold three)."""
    from megatron.core import parallel_state as ps

    return [
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_world_size(),
        ps.get_expert_model_parallel_world_size(),
        ps.get_expert_tensor_parallel_world_size(),
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
    weights_only: bool = False,
    keep_every: int | None = None,
    record: dict | None = None,
) -> Path:
    """Save on every rank (collective). Returns the final iteration folder.

    ``record``: more entries for its dense_model.json (the trainer's schedule in force and history).

    ``weights_only``: the model's sharded state alone (no optimizer, scheduler or RNG state), with
    ``"weights_only": true`` in its metadata, e.g. for imported weights (loads as weights, step 0).
    Every node's first local rank fsyncs what its ranks wrote before rank 0 publishes the folder.
    Out of space: CheckpointError, one line (``_disk_full_says_so``)."""
    root = Path(root)
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    with _disk_full_says_so(root, tmp, iteration, keep_last):
        _save(root, tmp, final, iteration, model, cfg, optimizer, scheduler, extra, keep_last,
              fully_parallel, weights_only, record, keep_every)  # fmt: skip
    return final


@contextlib.contextmanager
def _disk_full_says_so(root: Path, tmp: Path, iteration: int, keep_last: int | None):
    """A save that runs out of space raises CheckpointError with one line (the path, the space
    free, what keep_last needs; ``disk_full_message``), its partial folder removed by rank 0; the
    tracker still names the previous checkpoint. Any other failure is raised as it is."""
    try:
        yield
    except BaseException as err:  # torch.distributed.checkpoint's CheckpointException is one
        if isinstance(err, KeyboardInterrupt | SystemExit) or not is_disk_full(err, root):
            raise
        partial = folder_bytes(tmp)
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(disk_full_message(root, iteration, keep_last, partial)) from err


def _save(root, tmp, final, iteration, model, cfg, optimizer, scheduler, extra, keep_last,
          fully_parallel, weights_only, record, keep_every) -> None:  # fmt: skip
    """save_checkpoint's body: every rank writes into ``tmp``, rank 0 publishes it as ``final``."""
    from megatron.core import dist_checkpointing

    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob("iter_*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir()
    _barrier()

    finish_param_gather(model)
    model_state = _unwrap(model).sharded_state_dict()
    state = {"model": model_state, "iteration": iteration, "layout": _layout()}
    if not weights_only:
        state["rng_state"] = _rng_state_object()
    elif optimizer is not None or scheduler is not None or extra:
        raise ValueError("a weights_only checkpoint holds the model only")
    metadata = {}
    if optimizer is not None:
        metadata = optimizer_metadata(optimizer, cfg.checkpoint.optimizer_format)
        state["optimizer"] = optimizer.sharded_state_dict(model_state, metadata=metadata)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    state.update(extra or {})
    dist_checkpointing.save(
        state, str(tmp), sharded_strategy=_save_strategy(fully_parallel), content_metadata=metadata
    )
    # dist_checkpointing fsyncs its tensor files but not common.pt, .metadata, metadata.json or the
    # sharded objects (rng_state/): each node flushes what was written there (rank 0 again below).
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        fsync_tree(tmp)
    _barrier()

    if _rank() == 0:
        write_metadata(tmp, iteration, cfg, weights_only=weights_only, record=record)
        publish(tmp, final, root, iteration, keep_last, keep_every)
    _barrier()


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
    (iteration, consumed samples, ...). A weights-only checkpoint (``"weights_only": true`` in its
    metadata) loads the model alone: ``optimizer``, ``scheduler`` and ``load_rng`` are ignored."""
    from megatron.core import dist_checkpointing

    folder = resolve_checkpoint(folder)
    if read_metadata(folder).get("weights_only"):
        optimizer, scheduler, load_rng = None, None, False
    common = dist_checkpointing.load_common_state_dict(str(folder))
    saved_layout, layout = common.get("layout"), _layout()
    same_layout = saved_layout == layout
    model_state = _unwrap(model).sharded_state_dict()
    request = {"model": model_state}
    if optimizer is not None:
        content = dist_checkpointing.load_content_metadata(str(folder)) or {}
        optimizer_format = content.get("distrib_optim_sharding_type", RESHARDABLE_FORMAT)
        if optimizer_format == "dp_reshardable":
            _check_dp_reshardable(folder, saved_layout, layout, _is_distributed(optimizer))
        prepare_optimizer_for_load(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=True, metadata=optimizer_metadata(optimizer, optimizer_format)
        )
    if load_rng and same_layout:
        request["rng_state"] = _rng_state_object()
    loaded = dist_checkpointing.load(
        request, str(folder), sharded_strategy=_load_strategy(folder, same_layout)
    )
    _unwrap(model).load_state_dict(loaded["model"], strict=True)
    if optimizer is not None:
        optimizer_state = _regroup(loaded["optimizer"], common.get("optimizer", {}), optimizer)
        # no_grad: megatron-core 0.16.1 copies dp_reshardable state into the main params without
        # it; in fp32 those are views of the model's leaf parameters (an in-place autograd error).
        with torch.no_grad():
            optimizer.load_state_dict(optimizer_state)
        finish_optimizer_load(optimizer)
    if scheduler is not None and "scheduler" in loaded:
        scheduler.load_state_dict(loaded["scheduler"])
    if "rng_state" in request:
        _restore_rng(loaded["rng_state"])
    return loaded


def _load_strategy(folder: Path, same_layout: bool):
    """Fully parallel load at an unchanged layout: each data-parallel replica reads a share of the
    tensors replicated over DP and they exchange them (megatron-core's FullyParallelLoadStrategyWrapper).
    At a changed layout, the default loader: each rank reads what its new shards need."""
    if not same_layout or not dist.is_initialized():
        return None
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    if ps.get_data_parallel_world_size() == 1:
        return None
    return FullyParallelLoadStrategyWrapper(
        get_default_load_sharded_strategy(str(folder)), ps.get_data_parallel_group(with_context_parallel=True)
    )


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(opt, DistributedOptimizer) for opt in _sub_optimizers(optimizer))


def _check_dp_reshardable(
    folder: Path, saved_layout: list | None, layout: list[int], distributed: bool
) -> None:
    """A dp_reshardable optimizer state loads into a distributed optimizer at the same PP/TP/EP."""
    names = ["PP", "TP", "DP", "EP", "expert TP"]
    saved = list(saved_layout or [])
    if not distributed:
        raise CheckpointError(
            f"{folder}: its optimizer state is the distributed optimizer's (dp_reshardable); resume "
            "with parallel.use_distributed_optimizer=true"
        )
    if saved[:_DP] + saved[_DP + 1 :] != layout[:_DP] + layout[_DP + 1 :]:
        raise CheckpointError(
            f"{folder}: its distributed-optimizer state is dp_reshardable, saved at "
            f"{dict(zip(names, saved, strict=False))}, and loads only at the same PP/TP/EP (this job: "
            f"{dict(zip(names, layout, strict=True))}); resume it at its own layout and save again with "
            "checkpoint.optimizer_format=fully_reshardable, then change the layout"
        )


def _torch_state(state: dict) -> dict:
    """The torch-optimizer part (param_groups, state) of one megatron optimizer's state dict."""
    return state["optimizer"] if "optimizer" in state else state


def _per_optimizer(state: dict, count: int) -> list[dict]:
    """A (Chained)Optimizer state dict -> one state dict per chained optimizer: a chain of one
    saves its optimizer's dict as is, a longer chain one entry per optimizer under 0, 1, ..."""
    return [state] if count == 1 else [state[i] for i in range(count)]


def _regroup(loaded: dict, saved_common: dict, optimizer) -> dict:
    """The loaded optimizer state dict in the shape of this job's optimizer.

    At EP>1 megatron-core gives the expert parameters optimizers of their own (a ChainedOptimizer
    of two), at EP=1 they join the dense parameters' groups. The per-parameter tensors are keyed by
    parameter (no chain prefix) and load at any EP; only the common part, the param groups'
    hyperparameters and the shared Adam step, is laid out per optimizer. When the saved chain has
    another length, each group of this job takes the hyperparameters of the saved group with the
    same (wd_mult, lr_mult, is_decoupled_lr), and every optimizer the saved step."""
    subs = _sub_optimizers(optimizer)
    saved_count = max(1, sum(isinstance(k, int) for k in saved_common))
    if saved_count == len(subs):
        return loaded
    saved = [_torch_state(s) for s in _per_optimizer(saved_common, saved_count)]
    saved_groups = [group for s in saved for group in s["param_groups"]]
    steps = [s["state"]["common_step"] for s in saved if "common_step" in s.get("state", {})]
    hyper = ("wd_mult", "lr_mult", "is_decoupled_lr")
    regrouped = []
    for index, sub in enumerate(subs):
        state = (
            loaded[index] if len(subs) > 1 else {k: v for k, v in loaded.items() if not isinstance(k, int)}
        )
        inner = _torch_state(state)
        for group, live in zip(inner["param_groups"], sub.optimizer.param_groups, strict=True):
            wanted = {k: live.get(k) for k in hyper}
            twin = next((g for g in saved_groups if all(g.get(k) == v for k, v in wanted.items())), None)
            if twin is None:
                raise CheckpointError(
                    f"the checkpoint's optimizer has no param group with {wanted}; it was saved by a "
                    "run with other optimizer settings: resume with those, or load the model only"
                )
            params = group["params"]
            group.update({k: v for k, v in twin.items() if k != "params"})
            group.update(params=params, is_expert_parallel=live["is_expert_parallel"])
        if steps:
            inner.setdefault("state", {})["common_step"] = steps[0]
        regrouped.append(state)
    return regrouped[0] if len(subs) == 1 else dict(enumerate(regrouped))


def _restore_rng(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["python_torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def prepare_optimizer_for_load(optimizer) -> None:
    """Work around megatron-core 0.16.1's distributed optimizer load without Apex/TE.

    There, torch's Adam keeps a per-parameter "step": ``DistributedOptimizer.state_dict()`` reads it
    from every state (but a fresh optimizer has none), and the loaders copy every state key into
    the live state: the fully-reshardable one has no "step" to copy (KeyError), the dp-reshardable
    one copies the step this (fresh) optimizer had when the load was requested, which would put
    Adam's bias correction back to step 0. We give a fresh optimizer its state tensors, step
    included, and have the loader copy the live "step" onto itself: the real step is restored from
    the checkpoint's param groups before. A no-op with Apex/TE (fused Adam, no "step").
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
