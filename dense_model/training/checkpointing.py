"""Checkpoints with megatron-core ``dist_checkpointing``: saved at one TP/PP layout, loadable at any.

Layout of a run directory (Megatron-LM's names, so its users find their way)::

    RUN_DIR/checkpoints/latest_checkpointed_iteration.txt     "1200"
    RUN_DIR/checkpoints/iter_0001200/                         dist_checkpointing files
        dense_model.json     iteration, resolved config, tokenizer (type and file name)
        config.yaml          the same config, for people
        tokenizer.model      a copy of the tokenizer (or tokenizer/ for Hugging Face ones)

A checkpoint is written to ``iter_NNNNNNN.tmp`` and renamed into place only when every rank has
finished; ``latest_checkpointed_iteration.txt`` moves (write + fsync + rename) after that. A save
killed midway therefore leaves the previous checkpoint and the pointer to it untouched; the
leftover ``.tmp`` folder is removed by the next save.

The sharded state holds the model (PolyCom scalars included), the optimizer, and, as common state
saved once, the iteration, the scheduler, the consumed samples and the config; per-rank RNG states
are ``ShardedObject``s (restored when the layout is unchanged).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dense_model import collectives

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "dense_model.json"
CHECKPOINTS = "checkpoints"
# The distributed optimizer's state in a layout any TP/PP/DP can load (megatron-core 0.16 refuses
# its default "fully_sharded_model_space" format: flattened_range is no longer supported).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


class CheckpointError(RuntimeError):
    """A checkpoint path that does not exist or is not one of ours; the message says which and why."""


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def read_latest_iteration(root: str | os.PathLike) -> int | None:
    """The iteration the tracker file points at, or None when there is no checkpoint."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} holds {text!r}, not an iteration number; delete it or fix it")
    return int(text)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory, its checkpoints/ folder or one iter_NNNNNNN folder -> that iteration's folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / METADATA).is_file():
        return path
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    latest = read_latest_iteration(root)
    if latest is None:
        raise CheckpointError(
            f"{path} is not a dense_model checkpoint: expected a run directory with {CHECKPOINTS}/{TRACKER}, "
            f"a checkpoints folder with {TRACKER}, or an iter_NNNNNNN folder with {METADATA}"
        )
    folder = iteration_dir(root, latest)
    if not (folder / METADATA).is_file():
        raise CheckpointError(
            f"{root / TRACKER} points at iteration {latest} but {folder / METADATA} is missing"
        )
    return folder


def read_metadata(folder: str | os.PathLike) -> dict:
    return json.loads((Path(folder) / METADATA).read_text())


def _rank() -> int:
    return collectives.rank()


def _barrier() -> None:
    collectives.barrier()


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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

    from dense_model.config import config_to_dict, save_config

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
        tokenizer = _copy_tokenizer(cfg, tmp)
        meta = {
            "format": "dense_model/1",
            "iteration": iteration,
            "config": config_to_dict(cfg),
            "tokenizer": tokenizer,
        }
        _fsync_write(tmp / METADATA, json.dumps(meta, indent=2))
        save_config(cfg, tmp / "config.yaml")
        if final.exists():  # re-saving the same iteration (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_write(root / TRACKER, str(iteration))
        if keep_last:
            _prune(root, keep_last)
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


def _copy_tokenizer(cfg, folder: Path) -> dict | None:
    model_path = cfg.data.tokenizer_model
    if not model_path:
        return None
    src = Path(model_path)
    if src.is_dir():
        shutil.copytree(src, folder / "tokenizer")
        name = "tokenizer"
    else:
        name = "tokenizer" + (src.suffix or ".model")
        shutil.copy2(src, folder / name)
    return {"type": cfg.data.tokenizer_type, "file": name}


def _prune(root: Path, keep_last: int) -> None:
    folders = sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in folders[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    folder: str | os.PathLike, model, optimizer=None, scheduler=None, load_rng: bool = True
) -> dict:
    """Load into an already-built model (any TP/PP layout). Returns the common state
    (iteration, consumed samples, ...)."""
    from megatron.core import dist_checkpointing

    from dense_model.training.optim import finish_optimizer_load, prepare_optimizer_for_load

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


@dataclass
class InferenceModel:
    """A checkpoint loaded for inference: the model (eval mode), its config and tokenizer."""

    model: torch.nn.Module
    config: object
    tokenizer: object
    iteration: int
    folder: Path


def load_model_for_inference(
    path: str | os.PathLike,
    tensor_model_parallel_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> InferenceModel:
    """Load a run directory or one iteration for evaluation/export, at TP = the launcher's world size
    (or the given one) and PP = 1, whatever layout saved it. Starts the process groups if needed.

    A checkpoint trained with Transformer Engine layers loads into megatron-core's local layers when
    TE is not installed (an export or evaluation machine without it): the local spec names its
    norms as TE's fused norm+linear does (``sharded_state_dict_keys_map``), so the weights match, and
    TE's extra state is left unread. ``dtype`` (default: the training default, bf16 on a GPU when
    training.bf16) is the one the model is built in, so megatron-core's config agrees with it."""
    from dense_model.config import config_from_dict
    from dense_model.data.tokenizers import build_tokenizer
    from dense_model.model import build_model, transformer_engine_available
    from dense_model.parallel import initialize_parallel

    folder = resolve_checkpoint(path)
    meta = read_metadata(folder)
    cfg = config_from_dict(meta["config"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = tensor_model_parallel_size or world
    cfg.parallel.tensor_model_parallel_size = tp
    cfg.parallel.pipeline_model_parallel_size = 1
    cfg.parallel.sequence_parallel = False
    cfg.parallel.expert_model_parallel_size = 1  # MoE: all experts on every rank, split like TP
    cfg.parallel.expert_tensor_parallel_size = None
    cfg.training.recompute_granularity = "none"
    if cfg.model.transformer_impl == "transformer_engine" and not transformer_engine_available():
        logger.warning(
            "%s was trained with model.transformer_impl=transformer_engine; Transformer Engine is not "
            "available here, so it is loaded into megatron-core's local layers (same weights)",
            folder,
        )
        cfg.model.transformer_impl = "local"
    initialize_parallel(tp, 1, seed=cfg.training.seed)
    model = build_model(cfg, initialize=False, dtype=dtype)
    load_checkpoint(folder, model, load_rng=False)
    model.eval()
    tokenizer = None
    if meta.get("tokenizer"):
        tok = meta["tokenizer"]
        tokenizer = build_tokenizer(tok["type"], str(folder / tok["file"]))
        cfg.data.tokenizer_model = str(folder / tok["file"])
    return InferenceModel(
        model=model, config=cfg, tokenizer=tokenizer, iteration=meta["iteration"], folder=folder
    )
