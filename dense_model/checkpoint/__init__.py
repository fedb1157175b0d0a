"""The checkpoint format, one layer below training, evaluation and export, which all use it.

- ``layout``: names on disk (Megatron-LM's), the tracker file, metadata, durable publication and
  pruning (``fsync_tree``/``fsync_dir`` for any writer that renames a finished folder into place),
  what a training job loads (``plan_load``; ``plan_run_load`` also refuses a checkpoint of another
  model).
- ``state``: save and load of model, optimizer, scheduler and RNG with megatron-core
  ``dist_checkpointing`` (the model at any TP/PP/EP layout, the distributed optimizer's state at
  another DP size, or at any layout when saved ``fully_reshardable``).
- ``inference``: a checkpoint loaded for evaluation or export.

The trainer decides only *when* to save (``dense_model.training.pretrain``).
"""

from dense_model.checkpoint.layout import (
    CHECKPOINTS,
    METADATA,
    STALE,
    TRACKER,
    CheckpointError,
    LoadPlan,
    check_load_path,
    fsync_dir,
    fsync_tree,
    iteration_dir,
    plan_load,
    plan_run_load,
    read_latest_iteration,
    read_metadata,
    resolve_checkpoint,
)
from dense_model.checkpoint.state import finish_param_gather, load_checkpoint, save_checkpoint

__all__ = [
    "CHECKPOINTS",
    "METADATA",
    "STALE",
    "TRACKER",
    "CheckpointError",
    "LoadPlan",
    "check_load_path",
    "finish_param_gather",
    "fsync_dir",
    "fsync_tree",
    "iteration_dir",
    "load_checkpoint",
    "plan_load",
    "plan_run_load",
    "read_latest_iteration",
    "read_metadata",
    "resolve_checkpoint",
    "save_checkpoint",
]
