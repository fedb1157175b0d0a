"""Values derived from the config: the FFN widths, the padded vocabulary, the step counts."""

from __future__ import annotations

import math

from dense_model.activations import is_gated
from dense_model.config.checks import ConfigError
from dense_model.config.schema import Config, ModelConfig, ParallelConfig


def ffn_hidden_size(model: ModelConfig) -> int:
    """The FFN width: explicit, or parameter-matched to a SwiGLU of swiglu_ffn_hidden_size.

    A gated MLP has 3 matrices of hidden x F, a plain one 2: matching parameters gives
    F_plain = 1.5 x F_swiglu (5504 -> 8256).
    """
    if model.ffn_hidden_size is not None:
        return model.ffn_hidden_size
    if is_gated(model.activation):
        return model.swiglu_ffn_hidden_size
    return model.swiglu_ffn_hidden_size * 3 // 2


def moe_enabled(model: ModelConfig) -> bool:
    return bool(model.moe.num_experts)


def expert_ffn_hidden_size(model: ModelConfig) -> int:
    """Each routed expert's FFN width: explicit, or parameter-matched as for the dense FFN."""
    moe = model.moe
    if moe.ffn_hidden_size is not None:
        return moe.ffn_hidden_size
    return moe.swiglu_ffn_hidden_size if is_gated(model.activation) else moe.swiglu_ffn_hidden_size * 3 // 2


def expert_tensor_parallel_size(parallel: ParallelConfig) -> int:
    return parallel.expert_tensor_parallel_size or parallel.tensor_model_parallel_size


def padded_vocab_size(model: ModelConfig, tp: int) -> int:
    if model.vocab_size is None:
        raise ConfigError(
            "model.vocab_size is not resolved: it is the tokenizer's, filled in by "
            "dense_model.config.resolve_vocab_size(cfg) (the trainer and the launcher do); set "
            "model.vocab_size=N to build a model without a tokenizer"
        )
    multiple = model.make_vocab_size_divisible_by * tp
    return -(-model.vocab_size // multiple) * multiple


def train_and_warmup_steps(cfg: Config) -> tuple[int, int]:
    """(training steps, warm-up steps) from steps or tokens (warm-up not clamped)."""
    t = cfg.training
    tokens_per_step = t.global_batch_size * cfg.model.seq_length
    iters = t.train_iters if t.train_iters is not None else max(1, t.train_tokens // tokens_per_step)
    if t.lr_warmup_iters is not None:
        return iters, t.lr_warmup_iters
    return iters, math.ceil((t.lr_warmup_tokens or 0) / tokens_per_step)


def warmup_tokens(cfg: Config) -> int:
    """The warm-up in tokens: lr_warmup_iters steps of tokens, else lr_warmup_tokens (not rounded to
    steps: the token schedule, training.lr_decay_tokens, warms up over exactly these tokens)."""
    t = cfg.training
    if t.lr_warmup_iters is not None:
        return t.lr_warmup_iters * t.global_batch_size * cfg.model.seq_length
    return t.lr_warmup_tokens or 0
