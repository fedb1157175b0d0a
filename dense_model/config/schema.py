"""The config's schema: nested dataclasses, one per section, every field with a one-line docstring.

Each section's ``validate()`` checks its own fields (ranges, files); the settings that span sections
are ``rules.validate``'s. A new section brings its own ``validate()``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from dense_model.activations import get_activation_entry, import_activation_modules
from dense_model.config.checks import (
    ConfigError,
    check_split,
    divisors_near,
    fraction,
    non_negative,
    positive,
)
from dense_model.data.blend import load_blend
from dense_model.data.tokenizers import build_tokenizer
from dense_model.data.validation_sets import resolve_validation_sets

NO_TOKENIZER = "data.tokenizer_model is not set: give the tokenizer the data was made with"


@dataclass
class MoEConfig:
    """Mixture of experts in every layer's MLP (megatron-core's MoELayer); num_experts unset = dense."""

    num_experts: int | None = None
    """Routed experts per layer; None or 0 = a dense MLP."""
    router_topk: int = 2
    """Experts each token is sent to."""
    ffn_hidden_size: int | None = None
    """Expert FFN width; None = parameter-matched from swiglu_ffn_hidden_size (non-gated: 1.5x)."""
    swiglu_ffn_hidden_size: int = 1024
    """SwiGLU expert width the expert FFN is matched to when ffn_hidden_size is None (OLMoE: 1024)."""
    aux_loss_coeff: float = 0.01
    """Load-balancing (switch) auxiliary loss coefficient; 0 disables it."""
    z_loss_coeff: float | None = None
    """Router z-loss coefficient (OLMoE: 0.001); None disables it."""
    token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    """How tokens reach experts on other expert-parallel ranks."""
    capacity_factor: float | None = None
    """Expert capacity as a multiple of the even share (tokens over it are dropped); None = dropless."""
    shared_expert_ffn_hidden_size: int | None = None
    """Width of an always-on shared expert (same activation); None = no shared expert."""
    grouped_gemm: bool = True
    """Grouped-GEMM experts: Transformer Engine's where TE is installed (GPU) and the activation has no
    coefficients, else torch's grouped_mm (dense_model.moe_experts); false = one MLP after another."""
    router_score: Literal["topk_then_softmax", "softmax_then_topk"] = "topk_then_softmax"
    """Routing weights: softmax over the top-k logits (renormalised, Mixtral), or softmax over all
    experts then the top-k probabilities as they are (OLMoE; megatron-core's moe_router_pre_softmax)."""
    router_loss_scaling: Literal["per_layer", "olmoe"] = "per_layer"
    """What aux_loss_coeff/z_loss_coeff mean: per_layer = megatron-core's, each layer's loss times the
    coefficient (summed over layers); olmoe = megablocks' (OLMoE): averaged over layers, the z-loss also / top-k."""
    activation_params: Literal["per_expert", "shared"] = "per_expert"
    """The activation's coefficients (PolyCom's a0..ar): per_expert = each expert its own; shared = one set per
    MoE layer used by every expert of the layer (the seed's megablocks dMoE: one PolyNorm per OLMoE block)."""


@dataclass
class ModelConfig:
    num_layers: int = 24
    """Transformer layers."""
    hidden_size: int = 2048
    """Model width."""
    num_attention_heads: int = 16
    """Attention heads (query heads)."""
    num_query_groups: int | None = None
    """Key/value heads for GQA; None = as many as attention heads (no GQA, as in the paper)."""
    activation: str = "swiglu"
    """MLP activation, a name from dense_model.activations.list_activations()."""
    activation_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the activation, e.g. {order: 3} for polynorm/polyrelu."""
    activation_modules: list[str] = field(default_factory=list)
    """Modules imported before model.activation is looked up: activations registered outside dense_model."""
    fused_activation: bool = True
    """Use the activation's fused Triton kernel on GPUs when it has one (the torch reference otherwise)."""
    rope_fusion: bool | Literal["auto"] = "auto"
    """Fused RoPE (megatron's apply_rope_fusion): TE's where installed, else dense_model.rope's Triton kernel; auto = on GPUs, true = error where neither runs, false = unfused."""
    ffn_hidden_size: int | None = None
    """FFN width; None = derived from swiglu_ffn_hidden_size, parameter-matched to the activation."""
    swiglu_ffn_hidden_size: int = 5504
    """SwiGLU width the FFN is matched to when ffn_hidden_size is None (non-gated: 1.5x, 5504 -> 8256)."""
    vocab_size: int | None = None
    """Vocabulary size; None = the tokenizer's (data.tokenizer_model, or the demo's). The embedding is
    padded to make_vocab_size_divisible_by x TP; an explicit value below the tokenizer's is refused."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this times TP (Megatron's default)."""
    seq_length: int = 4096
    """Sequence length in tokens."""
    rotary_base: int = 10000
    """RoPE base."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    init_method_std: float = 0.013975
    """Std of the normal init, sqrt(2 / (5 * hidden)); output layers are scaled by depth."""
    init: Literal["megatron", "olmo_normal"] = "megatron"
    """Weight init: megatron = normal(0, init_method_std), residual-writing layers / sqrt(2 * layers);
    olmo_normal = OLMo's init_fn normal: every matrix (router, embeddings, output layer too) normal(0,
    init_method_std) truncated at +-init_cutoff_factor std, no depth scaling."""
    init_cutoff_factor: float = 3.0
    """olmo_normal: truncate the normal at +- this many standard deviations (OLMo's init_cutoff_factor)."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    untie_embeddings: bool = True
    """Separate input embedding and output layer weights (Llama style)."""
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    """Layer implementation: megatron-core's local modules, or Transformer Engine (GPU, if installed)."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture of experts (off unless moe.num_experts is set)."""
    attention_backend: Literal["auto", "local", "sdpa", "te"] = "auto"
    """Core attention: auto = Transformer Engine's with transformer_impl=transformer_engine, else torch's
    scaled_dot_product_attention on GPUs (dense_model.attention), else megatron-core's local module."""
    qk_norm: Literal["none", "per_head", "full"] = "none"
    """RMSNorm of queries and keys before RoPE (dense_model.qk_norm): none; per_head = megatron-core's
    qk_layernorm (a head_dim gain shared by the heads); full = OLMoE's, over all heads (gain hidden wide)."""

    def validate(self) -> None:
        try:
            import_activation_modules(self.activation_modules)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        try:
            entry = get_activation_entry(self.activation)
        except ValueError as err:
            raise ConfigError(f"model.activation: {err}") from None
        try:
            entry.cls(**self.activation_kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"model.activation_kwargs: {self.activation} rejects {self.activation_kwargs}: {err}"
            ) from None
        positive(self, "model", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups")
        positive(self, "model", "ffn_hidden_size", "swiglu_ffn_hidden_size", "vocab_size")
        positive(self, "model", "make_vocab_size_divisible_by", "seq_length", "rotary_base")
        positive(self, "model", "norm_epsilon", "init_method_std", "init_cutoff_factor")
        fraction(self, "model", "hidden_dropout", "attention_dropout")
        if self.attention_backend == "te" and self.transformer_impl != "transformer_engine":
            raise ConfigError(
                "model.attention_backend=te needs model.transformer_impl=transformer_engine; "
                "set model.attention_backend to auto, sdpa or local"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_attention_heads="
                f"{self.num_attention_heads}; pick a head count that divides it (e.g. "
                f"{divisors_near(self.hidden_size, self.num_attention_heads)})"
            )
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_query_groups={groups}; use a group count that divides the head count"
            )


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    """TP: ranks the attention heads and FFN width are split over."""
    pipeline_model_parallel_size: int = 1
    """PP: pipeline stages; num_layers must divide evenly."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs TP > 1)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduce with backward (GPU)."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with forward (GPU)."""
    expert_model_parallel_size: int = 1
    """EP: ranks the MoE experts are spread over (model.moe.num_experts must divide evenly)."""
    expert_tensor_parallel_size: int | None = None
    """Expert TP: ranks each expert's FFN width is split over; None = tensor_model_parallel_size."""
    distributed_timeout_minutes: float = 30
    """How long a collective may wait for the other ranks before the job fails (a rank that died or
    hangs): torch.distributed's process-group timeout (Megatron-LM's --distributed-timeout-minutes)."""

    def validate(self) -> None:
        positive(
            self,
            "parallel",
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "distributed_timeout_minutes",
        )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1")


@dataclass
class TrainingConfig:
    micro_batch_size: int = 2
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 64
    """Sequences per optimizer step over all ranks (gradient accumulation fills the gap)."""
    train_iters: int | None = None
    """Optimizer steps; None = derived from train_tokens."""
    train_tokens: int | None = 100_000_000_000
    """Tokens to train on when train_iters is None (paper: 100B)."""
    lr: float = 3.0e-4
    """Peak learning rate."""
    min_lr: float = 3.0e-5
    """Learning rate at the end of the cosine decay."""
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    lr_warmup_tokens: int | None = 620_000_000
    """Warmup length in tokens (paper: 620M); lr_warmup_iters overrides it when set."""
    lr_warmup_iters: int | None = None
    """Warmup length in steps."""
    lr_warmup_init: float = 0.0
    """Warm-up starts at this fraction of lr, not 0 (OLMo's default warmup_min_lr: 0.1 x lr)."""
    lr_decay_tokens: int | None = None
    """Schedule in tokens: warm-up then decay to min_lr over this many tokens from the start, however
    long training is (OLMo's t_max; the seed's MoE run: 5T), step k at k x tokens per step; None =
    megatron's schedule in steps, decaying over the training length."""
    weight_decay: float = 0.1
    """AdamW weight decay (on the parameters training.weight_decay_on says; never on PolyCom scalars)."""
    weight_decay_on: Literal["matrices", "all"] = "matrices"
    """Parameters weight decay applies to: matrices = megatron's (not 1-D parameters and biases: norms,
    PolyCom scalars); all = every parameter but the PolyCom scalars (OLMo's decay_norm_and_bias)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1.0e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Gradient clipping by global norm (0 disables)."""
    fused_adam: bool | Literal["auto"] = "auto"
    """torch's fused AdamW kernel (without TE/apex): auto = on GPUs, true = also on the CPU, false = foreach."""
    cross_entropy_fusion: bool | Literal["auto"] = "auto"
    """megatron-core's native fused cross-entropy (cross_entropy_loss_fusion, impl 'native': its steps
    torch.compile'd, the target-logit and sum-of-exponentials TP all-reduces merged into one); it still
    upcasts the logits to fp32 and always returns the logits' gradient in bf16. auto = on GPUs in bf16;
    true = also in fp32 and on the CPU (there the logits' gradient is rounded to bf16); false = the
    unfused vocab-parallel cross-entropy."""
    bf16: bool = True
    """bf16 mixed precision (on GPUs; the CPU always runs fp32)."""
    seed: int = 1234
    """Random seed (weights, data order, dropout)."""
    data_seed: int | None = None
    """Seed of the data order alone; None = training.seed (studies vary init and data separately)."""
    recompute_granularity: Literal["none", "selective", "full"] = "selective"
    """Activation recompute: selective (the local core attention; none with SDPA/TE, whose fused kernels keep no scores) or full layers."""
    recompute_method: Literal["uniform", "block"] = "uniform"
    """How full recompute picks layers."""
    recompute_num_layers: int = 1
    """Layers per recompute chunk (full recompute)."""
    eod_mask_loss: bool = False
    """Mask the loss on end-of-document tokens."""
    nan_policy: Literal["stop", "skip"] = "stop"
    """A NaN/Inf loss or gradient: stop with a message naming the step, or skip the step."""
    peak_flops: float | None = None
    """Peak FLOP/s per device for MFU; None = detected from the GPU name (A100/H100/H200 bf16)."""
    manual_gc: bool | Literal["auto"] = "auto"
    """Python's garbage collector under the trainer's control (Megatron-LM's --manual-gc): automatic
    collection off while the loop runs; a full collection on entry, every manual_gc_interval steps and
    before each evaluation and checkpoint save (the youngest generation after each), so every rank
    pauses at the same points and never inside a step. auto = on GPUs, true = also on the CPU,
    false = Python's automatic collector."""
    manual_gc_interval: int = 0
    """With manual_gc: a full collection every N steps; 0 = none between steps, only on entry and around
    evaluations and saves (Megatron-LM's default)."""

    def validate(self) -> None:
        positive(self, "training", "micro_batch_size", "global_batch_size", "train_iters", "train_tokens")
        positive(self, "training", "lr", "adam_eps", "recompute_num_layers", "peak_flops")
        non_negative(self, "training", "min_lr", "weight_decay", "clip_grad")
        non_negative(self, "training", "lr_warmup_tokens", "lr_warmup_iters", "manual_gc_interval")
        fraction(self, "training", "adam_beta1", "adam_beta2")
        if self.train_iters is None and self.train_tokens is None:
            raise ConfigError("set training.train_iters or training.train_tokens")
        if self.manual_gc is False and self.manual_gc_interval:
            raise ConfigError(
                f"training.manual_gc_interval={self.manual_gc_interval} has no effect with "
                "training.manual_gc=false; set training.manual_gc=auto (or true), or the interval to 0"
            )
        if self.min_lr > self.lr:
            raise ConfigError(
                f"training.min_lr={self.min_lr} is above training.lr={self.lr}; set it at or below lr"
            )
        fraction(self, "training", "lr_warmup_init")
        positive(self, "training", "lr_decay_tokens")


@dataclass
class RepetitionFilterConfig:
    """OLMo's instance filter (the seed's data.instance_filter): a train sample with a token sequence of
    period min_period..max_period repeated max_count times or more is masked from the loss."""

    enabled: bool = False
    """Apply the filter to training samples (validation samples are never filtered)."""
    min_period: int = 1
    """Shortest repeated sequence checked, in tokens (seed: repetition_min_period 1)."""
    max_period: int = 13
    """Longest repeated sequence checked, in tokens (seed: repetition_max_period 13)."""
    max_count: int = 32
    """Repeats back to back that filter a sample (seed: repetition_max_count 32)."""

    def validate(self) -> None:
        for name in ("min_period", "max_period", "max_count"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"data.repetition_filter.{name}={getattr(self, name)}: give a positive number"
                )
        if self.min_period > self.max_period:
            raise ConfigError(
                f"data.repetition_filter.min_period={self.min_period} > max_period={self.max_period}; "
                "give min_period <= max_period"
            )


@dataclass
class DataConfig:
    blend: str | None = None
    """Blend file (JSON) written by preprocess_data.py --split-by-subset."""
    paths: list[str] = field(default_factory=list)
    """Megatron mmap prefixes (PREFIX_text_document) when no blend file is given."""
    weights: list[float] | None = None
    """Weights for paths (None = proportional to size, Megatron's behaviour)."""
    tokenizer_type: Literal["sentencepiece", "huggingface"] = "sentencepiece"
    """Tokenizer library."""
    tokenizer_model: str | None = None
    """SentencePiece .model file or Hugging Face tokenizer folder."""
    split: str = "969,30,1"
    """Train/valid/test split of each dataset, in parts."""
    cache_dir: str | None = None
    """Where megatron-core caches its sample indices; None = RUN_DIR/data_cache."""
    num_workers: int = 2
    """DataLoader workers."""
    demo: bool = False
    """Use the RedPajama-format sample shipped in examples/ (tokenised on first use)."""
    validation_sets: dict[str, str] = field(default_factory=dict)
    """Named held-out sets {NAME: dataset prefix or blend .json}, each scored at every evaluation
    (the same samples: eval_iters batches at most) and logged as valid/NAME/loss and /ppl."""
    repetition_filter: RepetitionFilterConfig = field(default_factory=RepetitionFilterConfig)
    """OLMo's repetition filter on training samples (off unless enabled)."""

    def validate(self, files: bool = True) -> None:
        """``files=False``: the values alone, no file read (a dry run on a machine without the data)."""
        non_negative(self, "data", "num_workers")
        self.repetition_filter.validate()
        check_split(self.split)
        if not files:
            given = [f"data.{name}" for name in ("blend", "paths") if getattr(self, name)]
            if self.demo and given:
                raise ConfigError(f"data.demo=true and {' and '.join(given)} are both set; set one")
            return
        try:  # names and files here; batch size and vocabulary in rules.validate
            resolve_validation_sets(self.validation_sets)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.weights is not None:
            if len(self.weights) != len(self.paths):
                raise ConfigError(
                    f"data.weights has {len(self.weights)} entries but data.paths has {len(self.paths)}; "
                    "give one weight per path"
                )
            for i, w in enumerate(self.weights):
                if not (math.isfinite(w) and w >= 0):
                    raise ConfigError(f"data.weights[{i}]={w}: weights must be finite and >= 0")
            if self.weights and sum(self.weights) <= 0:
                raise ConfigError("data.weights sum to 0; give at least one dataset a positive weight")
        if self.demo:
            given = [f"data.{name}" for name in ("blend", "paths") if getattr(self, name)]
            if given:  # the demo would replace them with its own blend: say so instead of training on it
                raise ConfigError(
                    f"data.demo=true trains on the demo sample, but {' and '.join(given)} is also set; "
                    f"set data.demo=false to train on your data, or leave {' and '.join(given)} unset"
                )
            return  # the demo fills in its own blend and tokenizer
        if not self.blend and not self.paths:
            raise ConfigError(
                "no training data: set data.blend (a blend file from preprocess_data.py) or data.paths "
                "(mmap prefixes PREFIX_text_document), or data.demo=true"
            )
        if self.blend:
            try:
                load_blend(self.blend)
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ConfigError(f"data.blend: {err}") from None
        for i, prefix in enumerate(self.paths):
            for ext in (".bin", ".idx"):
                if not os.path.isfile(prefix + ext):
                    raise ConfigError(
                        f"data.paths[{i}]: {prefix}{ext} does not exist; give the prefix of a dataset "
                        "written by preprocess_data.py (PREFIX_text_document, without .bin/.idx)"
                    )
        if not self.tokenizer_model:
            raise ConfigError(NO_TOKENIZER)
        # The tokenizer itself is loaded once, by rules.validate (its vocabulary is the model's).

    def tokenizer_vocab_size(self) -> int:
        """The tokenizer's vocabulary: the demo's, or data.tokenizer_model's (loaded); ConfigError
        naming the field if it cannot load."""
        if self.demo:
            from dense_model.data.demo import DEMO_VOCAB_SIZE

            return DEMO_VOCAB_SIZE
        if not self.tokenizer_model:
            raise ConfigError(NO_TOKENIZER)
        try:
            return build_tokenizer(self.tokenizer_type, self.tokenizer_model).vocab_size
        except Exception as err:  # noqa: BLE001 - any library's failure to parse the file
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"data.tokenizer_model: cannot load {self.tokenizer_model} as a {self.tokenizer_type} "
                f"tokenizer ({first}); give the tokenizer file or folder the data was made with"
            ) from None


@dataclass
class CheckpointConfig:
    save_interval: int | None = 1000
    """Save every N steps (and at the end); None = only at the end."""
    keep_last: int | None = 3
    """Keep the last K checkpoints; None keeps all."""
    keep_every: int | None = None
    """Also keep every checkpoint whose step is a multiple of N (a run's history, scored later)."""
    load: str | None = None
    """A checkpoint to start from while the run has none of its own: a run directory, its
    checkpoints/ folder or one iter_NNNNNNN folder (refused before launch if it does not resolve).
    Once the run has saved, a relaunch resumes its own latest checkpoint and says load is unused."""
    load_mode: Literal["resume", "weights"] = "resume"
    """How checkpoint.load is loaded. resume: its step, optimizer, scheduler and data position
    continue (Megatron-LM's --load); weights: the model weights only, from step 0 with a fresh
    optimizer and schedule (Megatron-LM's --finetune). A weights-only checkpoint (an import) always
    loads as weights."""
    fresh: bool = False
    """Do not resume the run directory's own checkpoints: start from step 0 (or checkpoint.load).
    They stay until this run's first save, which moves those above its step to checkpoints/stale/."""
    fully_parallel_save: bool = True
    """Spread the save over data-parallel ranks (dist_checkpointing's fully parallel strategy)."""
    optimizer_format: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    """Distributed-optimizer state on disk. dp_reshardable: each rank writes its own shard (no
    gather), resumable at another DP size but the same TP/PP/EP; fully_reshardable: gathered into
    per-parameter tensors on save, resumable at any layout (costs the whole state on every rank)."""

    def validate(self) -> None:
        positive(self, "checkpoint", "save_interval", "keep_last", "keep_every")
        # checkpoint.load is checked where it is used (checkpoint.layout.plan_load, before launch):
        # a run with checkpoints of its own does not use it.


@dataclass
class LoggingConfig:
    log_interval: int = 10
    """Steps between log lines / metrics.jsonl entries."""
    eval_interval: int = 1000
    """Steps between validation runs."""
    eval_iters: int = 20
    """Global batches per validation run (the same batches every time, so runs compare)."""
    tensorboard: bool = True
    """Write TensorBoard events in the run directory."""
    wandb_project: str | None = None
    """Also log to Weights & Biases under this project (if wandb is installed)."""

    def validate(self) -> None:
        positive(self, "logging", "log_interval")
        non_negative(self, "logging", "eval_interval", "eval_iters")


@dataclass
class InLoopEvalConfig:
    tasks: list[str] = field(default_factory=list)
    """lm-eval tasks scored on the live model during training (empty: off), logged as downstream/TASK/METRIC."""
    interval: int = 1000
    """Steps between in-loop evaluations (and one at the last step)."""
    limit: int | None = None
    """Examples per task (lm-eval's --limit); None scores every example."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt (lm-eval's --num_fewshot); None: the task's own default."""
    include_path: str | None = None
    """Folder of local lm-eval task YAML files (lm-eval's --include_path), e.g. examples/lm_eval_tasks."""
    batch_size: int = 8
    """Requests per forward on each data-parallel rank (run_lm_eval.sh's default)."""

    def validate(self) -> None:
        positive(self, "evaluation.in_loop", "interval", "limit", "batch_size")
        non_negative(self, "evaluation.in_loop", "num_fewshot")
        if self.include_path is not None and not os.path.isdir(self.include_path):
            raise ConfigError(
                f"evaluation.in_loop.include_path={self.include_path}: no such folder; give the folder "
                "of your task YAML files (e.g. examples/lm_eval_tasks, relative to where the job starts)"
            )


@dataclass
class EvaluationConfig:
    in_loop: InLoopEvalConfig = field(default_factory=InLoopEvalConfig)
    """Downstream (lm-eval) tasks scored during training on the live model."""

    def validate(self) -> None:
        self.in_loop.validate()


@dataclass
class Config:
    run_dir: str = "runs/default"
    """Where config.yaml, metrics.jsonl, TensorBoard events and checkpoints/ go."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor/pipeline/data parallel layout."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Optimizer, schedule, batch, precision."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets and tokenizer."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Log lines, metrics, TensorBoard."""
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    """Downstream tasks in the training loop (off by default)."""


def sections(cfg: Config) -> list[tuple[str, Any]]:
    """(name, section) for every config section, in declaration order."""
    return [
        (f.name, getattr(cfg, f.name))
        for f in dataclasses.fields(cfg)
        if dataclasses.is_dataclass(getattr(cfg, f.name))
    ]
