"""The cross-field rules, checked before any process group starts: every section's own
``validate()``, then the settings that span sections (hidden not divisible by heads, FFN width not
divisible by TP, warm-up not shorter than training, the MoE layout, the world size)."""

from __future__ import annotations

from dense_model.config.checks import ConfigError
from dense_model.config.derived import (
    expert_ffn_hidden_size,
    expert_tensor_parallel_size,
    ffn_hidden_size,
    moe_enabled,
    train_and_warmup_steps,
    warmup_tokens,
)
from dense_model.config.schema import Config, sections


def validate(cfg: Config, world_size: int | None = None, *, files: bool = True) -> None:
    """Raise ConfigError with the field and the fix if ``cfg`` cannot run on ``world_size`` ranks.
    ``files=False``: the values alone, no data, tokenizer or validation set read (the dry run's
    first check; model.vocab_size stays as given)."""
    for _, section in sections(cfg):
        if section is cfg.data:
            section.validate(files=files)
        else:
            section.validate()
    m, p, t = cfg.model, cfg.parallel, cfg.training
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % tp:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"parallel.tensor_model_parallel_size={tp}; use a TP size that divides the head count"
        )
    if groups % tp:
        raise ConfigError(
            f"model.num_query_groups={groups} is not divisible by parallel.tensor_model_parallel_size="
            f"{tp}; use a TP size that divides the group count"
        )
    ffn = ffn_hidden_size(m)
    if ffn % tp:
        raise ConfigError(
            f"FFN width {ffn} (model.ffn_hidden_size, or derived from model.swiglu_ffn_hidden_size="
            f"{m.swiglu_ffn_hidden_size} for {m.activation}) is not divisible by "
            f"parallel.tensor_model_parallel_size={tp}; set model.ffn_hidden_size to a multiple of {tp}"
        )
    if m.num_layers % pp:
        raise ConfigError(
            f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline_model_parallel_size="
            f"{pp}; use a PP size that divides the layer count"
        )
    iters, warmup = train_and_warmup_steps(cfg)
    if warmup >= iters:
        raise ConfigError(
            f"the learning-rate warm-up ({warmup} steps, training.lr_warmup_iters or "
            f"training.lr_warmup_tokens) is not shorter than training ({iters} steps); lower the "
            "warm-up or train longer"
        )
    if t.lr_decay_tokens is not None and t.lr_decay_tokens <= warmup_tokens(cfg):
        raise ConfigError(
            f"training.lr_decay_tokens={t.lr_decay_tokens} is not longer than the warm-up "
            f"({warmup_tokens(cfg)} tokens, training.lr_warmup_tokens or lr_warmup_iters); raise it "
            "or shorten the warm-up"
        )
    _validate_moe(cfg, world_size)
    _validate_in_loop_layout(cfg)
    if world_size is not None:
        if world_size % (tp * pp):
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor_model_parallel_size x "
                f"pipeline_model_parallel_size = {tp} x {pp} = {tp * pp}; launch a multiple of "
                f"{tp * pp} processes or change parallel.*"
            )
        dp = world_size // (tp * pp)
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(
                f"training.global_batch_size={t.global_batch_size} is not divisible by "
                f"training.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}; "
                f"use a multiple of {t.micro_batch_size * dp}"
            )
    if not files:
        return
    resolve_vocab_size(cfg)  # last (the layout's messages first): loads the tokenizer, once
    if cfg.data.validation_sets:  # reads the sets' indexes (their tokens: the launcher's check_data)
        _check_validation_sets(cfg)


def _validate_moe(cfg: Config, world_size: int | None) -> None:
    """The MoE section and the expert-parallel layout (model.moe, parallel.expert_*)."""
    m, p = cfg.model, cfg.parallel
    moe = m.moe
    ep, etp = p.expert_model_parallel_size, expert_tensor_parallel_size(p)
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if ep < 1 or etp < 1:
        raise ConfigError("parallel.expert_model_parallel_size and expert_tensor_parallel_size must be >= 1")
    if not moe_enabled(m):
        if ep > 1 or etp != tp:
            raise ConfigError(
                "parallel.expert_model_parallel_size / expert_tensor_parallel_size are set but the "
                "model is dense; set model.moe.num_experts or leave them at their defaults"
            )
        return
    e = moe.num_experts
    if e < 0:
        raise ConfigError(f"model.moe.num_experts must be positive (or 0/null for dense), got {e}")
    if not 1 <= moe.router_topk <= e:
        raise ConfigError(f"model.moe.router_topk={moe.router_topk} must be between 1 and num_experts={e}")
    if e % ep:
        raise ConfigError(
            f"model.moe.num_experts={e} is not divisible by parallel.expert_model_parallel_size={ep}; "
            "use an EP size that divides the expert count"
        )
    width = expert_ffn_hidden_size(m)
    if width <= 0 or width % etp:
        raise ConfigError(
            f"expert FFN width {width} (model.moe.ffn_hidden_size or swiglu_ffn_hidden_size) is not a "
            f"positive multiple of the expert tensor-parallel size {etp}"
        )
    shared = moe.shared_expert_ffn_hidden_size
    if shared is not None and (shared <= 0 or shared % tp):
        raise ConfigError(
            f"model.moe.shared_expert_ffn_hidden_size={shared} must be a positive multiple of "
            f"parallel.tensor_model_parallel_size={tp}"
        )
    if moe.capacity_factor is not None and moe.capacity_factor <= 0:
        raise ConfigError(
            f"model.moe.capacity_factor={moe.capacity_factor} must be positive, or null for dropless"
        )
    if moe.aux_loss_coeff < 0 or (moe.z_loss_coeff or 0) < 0:
        raise ConfigError("model.moe.aux_loss_coeff and z_loss_coeff must be >= 0")
    if tp > 1 and not p.sequence_parallel:
        raise ConfigError(
            "model.moe with parallel.tensor_model_parallel_size > 1 needs parallel.sequence_parallel=true "
            "(megatron-core's MoE layer refuses to train with TP but without sequence parallelism)"
        )
    if etp != tp and ep == 1:
        # megatron's DDP reduces expert gradients over the expert data-parallel group only when
        # EP > 1; with EP = 1 it would average different expert-TP shards over the dense DP group.
        raise ConfigError(
            f"parallel.expert_tensor_parallel_size={etp} differs from tensor_model_parallel_size={tp} "
            "but expert_model_parallel_size=1; use EP > 1 or leave expert_tensor_parallel_size unset"
        )
    if moe.activation_params == "shared":
        _check_shared_activation_params(m.activation, m.activation_kwargs)
    if world_size is not None and world_size % (etp * ep * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by expert_tensor_parallel_size x "
            f"expert_model_parallel_size x pipeline_model_parallel_size = {etp} x {ep} x {pp}; "
            "launch a multiple of that many processes or change parallel.expert_*"
        )


def _check_shared_activation_params(activation: str, kwargs: dict) -> None:
    """``model.moe.activation_params=shared``: something to share. Any expert layout sums the
    gradient right (``dense_model.moe.SharedExpertActivation``), expert-TP equal to TP or not."""
    from dense_model.activations import build_activation

    if next(build_activation(activation, **kwargs).parameters(), None) is None:
        raise ConfigError(
            f"model.moe.activation_params=shared: model.activation={activation} has no parameters to share; "
            "set model.moe.activation_params=per_expert (or a PolyCom activation: polynorm, polyrelu)"
        )


def resolve_vocab_size(cfg: Config, tokenizer_vocab: int | None = None) -> int:
    """The model's vocabulary: model.vocab_size, or the tokenizer's when it is unset (``tokenizer_vocab``,
    or data's tokenizer loaded). ConfigError if an explicit model.vocab_size is below the tokenizer's:
    token ids past the embedding fail only after launch (a device-side assert on GPUs)."""
    data = cfg.data
    vocab = data.tokenizer_vocab_size() if tokenizer_vocab is None else tokenizer_vocab
    explicit = cfg.model.vocab_size
    if explicit is None:
        return vocab
    if explicit < vocab:
        tokenizer = "the demo's tokenizer" if data.demo else f"the tokenizer {data.tokenizer_model}"
        raise ConfigError(
            f"model.vocab_size={explicit} is below the {vocab} tokens of {tokenizer}; leave "
            f"model.vocab_size unset (the tokenizer's, padded) or set it to at least {vocab}"
        )
    return explicit


def _check_validation_sets(cfg: Config) -> None:
    """data.validation_sets against the batch (one line, exit 2 before launch)."""
    from dense_model.data.validation_sets import check_validation_sets, resolve_validation_sets

    try:
        check_validation_sets(
            resolve_validation_sets(cfg.data.validation_sets),
            seq_length=cfg.model.seq_length,
            global_batch_size=cfg.training.global_batch_size,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _validate_in_loop_layout(cfg: Config) -> None:
    """evaluation.in_loop scores on the live model at its own layout (TP, PP, sequence parallelism,
    EP: dense_model/training/downstream.py). Where the expert groups span DP ranks (EP > 1, or an
    expert TP above TP) the DP ranks' forwards run in lockstep, a done rank feeding one dummy token:
    the allgather dispatcher needs every rank's batch to have the same shape, and with a capacity
    factor the padding (sequence parallelism) or the split over ranks could decide which real tokens
    are dropped."""
    if not cfg.evaluation.in_loop.tasks:
        return
    p, moe = cfg.parallel, cfg.model.moe
    if not moe.num_experts:
        return
    # the expert groups (expert TP x EP) reach beyond the TP ranks of one DP rank
    spans_ranks = p.expert_model_parallel_size * expert_tensor_parallel_size(p) > p.tensor_model_parallel_size
    layout = f"parallel.expert_model_parallel_size={p.expert_model_parallel_size}"
    if p.expert_model_parallel_size == 1:
        layout = f"parallel.expert_tensor_parallel_size={p.expert_tensor_parallel_size}"
    if spans_ranks and moe.token_dispatcher == "allgather":
        raise ConfigError(
            f"evaluation.in_loop.tasks is set but model.moe.token_dispatcher=allgather at "
            f"{layout}: the in-loop requests give the "
            "expert-parallel ranks batches of different shapes, which allgather cannot exchange; use "
            "model.moe.token_dispatcher=alltoall"
        )
    if moe.capacity_factor is not None and (spans_ranks or p.sequence_parallel):
        raise ConfigError(
            f"evaluation.in_loop.tasks is set but model.moe.capacity_factor={moe.capacity_factor} with "
            + ("parallel.sequence_parallel=true" if p.sequence_parallel else layout)
            + ": the evaluation's padding could drop real tokens; score the saved checkpoints instead "
            "(run_lm_eval.sh RUN_DIR TASKS --every-checkpoint) or train dropless (capacity_factor=null)"
        )
