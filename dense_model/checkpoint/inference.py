"""A checkpoint loaded for inference (evaluation, export): at TP = the launcher's world size (or
the given one), PP = 1, whatever layout saved it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dense_model.checkpoint.layout import read_metadata, resolve_checkpoint
from dense_model.checkpoint.state import load_checkpoint
from dense_model.config import config_from_dict
from dense_model.data.tokenizers import build_tokenizer
from dense_model.model import build_model, transformer_engine_available
from dense_model.parallel import initialize_parallel

logger = logging.getLogger(__name__)


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
    # The fused RoPE changes no weight: where training asked for it (true), this machine takes what
    # runs here (a CPU export machine has none, and true would be a ConfigError).
    cfg.model.rope_fusion = "auto"
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
