"""The typed config: nested dataclasses, loaded from YAML with dotted ``key=value`` overrides.

    cfg = load_config("configs/1b/polynorm.yaml", ["model.activation=polyrelu", "training.lr=2e-4"])
    validate(cfg, world_size=32)   # before any process group exists; raises ConfigError

    python -m dense_model.config CONFIG [k=v ...] --world-size 32 [--dry-run]   # run_pretrain.sh's check

Every field has a one-line docstring (the comment after it). Unknown keys and wrong types are
rejected on loading; then each section's ``validate()`` checks its own fields (ranges, files), and
``validate()`` the settings that span sections (hidden not divisible by heads, FFN width not
divisible by TP, warm-up not shorter than training, ...). A new section brings its own
``validate()``. Every message names the field's dotted name and the fix. A YAML file may name a ``base:`` file (relative
to itself) whose values it overrides, so the per-activation 1B configs share one base.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dense_model.activations import get_activation_entry, import_activation_modules, is_gated
from dense_model.data.blend import load_blend
from dense_model.data.tokenizers import build_tokenizer
from dense_model.training.run_lock import RunDirBusy, check_free


class ConfigError(ValueError):
    """A config that cannot work; the message names the field and the fix."""


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
    ffn_hidden_size: int | None = None
    """FFN width; None = derived from swiglu_ffn_hidden_size, parameter-matched to the activation."""
    swiglu_ffn_hidden_size: int = 5504
    """SwiGLU width the FFN is matched to when ffn_hidden_size is None (non-gated: 1.5x, 5504 -> 8256)."""
    vocab_size: int = 32000
    """Tokenizer vocabulary size (the embedding is padded to make_vocab_size_divisible_by x TP)."""
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
        positive(self, "model", "norm_epsilon", "init_method_std")
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
                f"{_divisors_near(self.hidden_size, self.num_attention_heads)})"
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

    def validate(self) -> None:
        positive(self, "parallel", "tensor_model_parallel_size", "pipeline_model_parallel_size")
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
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to 1-D parameters: norms, PolyCom scalars)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1.0e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Gradient clipping by global norm (0 disables)."""
    bf16: bool = True
    """bf16 mixed precision (on GPUs; the CPU always runs fp32)."""
    seed: int = 1234
    """Random seed (weights, data order, dropout)."""
    data_seed: int | None = None
    """Seed of the data order alone; None = training.seed (studies vary init and data separately)."""
    recompute_granularity: Literal["none", "selective", "full"] = "selective"
    """Activation recompute: megatron's selective (attention core) or full layers."""
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

    def validate(self) -> None:
        positive(self, "training", "micro_batch_size", "global_batch_size", "train_iters", "train_tokens")
        positive(self, "training", "lr", "adam_eps", "recompute_num_layers", "peak_flops")
        non_negative(self, "training", "min_lr", "weight_decay", "clip_grad")
        non_negative(self, "training", "lr_warmup_tokens", "lr_warmup_iters")
        fraction(self, "training", "adam_beta1", "adam_beta2")
        if self.train_iters is None and self.train_tokens is None:
            raise ConfigError("set training.train_iters or training.train_tokens")
        if self.min_lr > self.lr:
            raise ConfigError(
                f"training.min_lr={self.min_lr} is above training.lr={self.lr}; set it at or below lr"
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

    def validate(self) -> None:
        non_negative(self, "data", "num_workers")
        _check_split(self.split)
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
            raise ConfigError("data.tokenizer_model is not set: give the tokenizer the data was made with")

        try:
            build_tokenizer(self.tokenizer_type, self.tokenizer_model)
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
    load: str | None = None
    """Checkpoint directory to start from; None = the run's own checkpoints/ (resume)."""
    fresh: bool = False
    """Ignore existing checkpoints in the run directory and start from step 0."""
    fully_parallel_save: bool = True
    """Spread the save over data-parallel ranks (dist_checkpointing's fully parallel strategy)."""
    optimizer_format: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    """Distributed-optimizer state on disk. dp_reshardable: each rank writes its own shard (no
    gather), resumable at another DP size but the same TP/PP/EP; fully_reshardable: gathered into
    per-parameter tensors on save, resumable at any layout (costs the whole state on every rank)."""

    def validate(self) -> None:
        positive(self, "checkpoint", "save_interval", "keep_last")
        if self.load is not None and not Path(self.load).exists():
            raise ConfigError(
                f"checkpoint.load: {self.load} does not exist; give a run directory, its checkpoints/ "
                "folder or one iter_NNNNNNN folder"
            )


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


# --------------------------------------------------------------------------------------------
# Derived values


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
    multiple = model.make_vocab_size_divisible_by * tp
    return -(-model.vocab_size // multiple) * multiple


# --------------------------------------------------------------------------------------------
# Loading


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, where: str):
    """Check (and lightly convert) a YAML value against a field type; raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}; write it as [a, b]")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}; write it as {{key: value}}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e9 written in YAML
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def _apply(obj, values: dict, prefix: str = "") -> None:
    """Set the dataclass ``obj``'s fields from a nested dict, rejecting unknown keys."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"unknown config key {where!r}; valid keys here: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
            _apply(current, value, where + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], where))


def read_yaml_mapping(path: Path, what: str = "config file", expected: str = "of sections") -> dict:
    """A YAML file whose top level is a mapping; ConfigError naming ``what`` and the file otherwise."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: the top level must be a mapping {expected}")
    return data


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if path.is_file() and path.resolve() in seen:
        raise ConfigError(f"config file {path}: 'base' chain loops back to itself")
    data = read_yaml_mapping(path)
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_yaml((path.parent / base), seen + (path.resolve(),))
    return _deep_merge(merged, data)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """``["model.activation=polynorm", "training.lr=3e-4"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. model.activation=polynorm)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key segment in {key!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is set both as a value and a section")
        node[parts[-1]] = value
    return out


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    _apply(cfg, data)
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (and its ``base:`` chain) <- dotted overrides. Types checked."""
    data = _read_yaml(Path(path)) if path is not None else {}
    data = _deep_merge(data, parse_overrides(overrides or []))
    return config_from_dict(data)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------------------------
# Validation (before any process group starts): each section checks its own fields in its
# validate(); validate() below runs them all, then the checks that span sections.


def _check_number(section, where: str, name: str, ok, need: str) -> None:
    value = getattr(section, name)
    if value is None:
        return
    if not (math.isfinite(value) and ok(value)):
        raise ConfigError(f"{where}.{name} must be {need}, got {value}")


def positive(section, where: str, *names: str) -> None:
    """Raise ConfigError unless each named field is None or a finite number > 0."""
    for name in names:
        _check_number(section, where, name, lambda v: v > 0, "a finite number > 0")


def non_negative(section, where: str, *names: str) -> None:
    for name in names:
        _check_number(section, where, name, lambda v: v >= 0, "a finite number >= 0 (0 disables)")


def fraction(section, where: str, *names: str) -> None:
    """Dropouts and Adam betas: in [0, 1)."""
    for name in names:
        _check_number(section, where, name, lambda v: 0 <= v < 1, "in [0, 1)")


def _check_split(split: str) -> None:
    fix = 'write it as train,valid,test parts, e.g. "969,30,1"'
    parts = str(split).replace("/", ",").split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"data.split={split!r} is not a list of numbers; {fix}") from None
    if len(values) > 3 or not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
        raise ConfigError(f"data.split={split!r}: at most 3 finite parts >= 0 with a positive sum; {fix}")


def sections(cfg: Config) -> list[tuple[str, Any]]:
    """(name, section) for every config section, in declaration order."""
    return [
        (f.name, getattr(cfg, f.name))
        for f in dataclasses.fields(cfg)
        if dataclasses.is_dataclass(getattr(cfg, f.name))
    ]


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Raise ConfigError with the field and the fix if ``cfg`` cannot run on ``world_size`` ranks."""
    for _, section in sections(cfg):
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
    _validate_moe(cfg, world_size)
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


def train_and_warmup_steps(cfg: Config) -> tuple[int, int]:
    """(training steps, warm-up steps) from steps or tokens (warm-up not clamped)."""
    t = cfg.training
    tokens_per_step = t.global_batch_size * cfg.model.seq_length
    iters = t.train_iters if t.train_iters is not None else max(1, t.train_tokens // tokens_per_step)
    if t.lr_warmup_iters is not None:
        return iters, t.lr_warmup_iters
    return iters, math.ceil((t.lr_warmup_tokens or 0) / tokens_per_step)


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
    if world_size is not None and world_size % (etp * ep * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by expert_tensor_parallel_size x "
            f"expert_model_parallel_size x pipeline_model_parallel_size = {etp} x {ep} x {pp}; "
            "launch a multiple of that many processes or change parallel.expert_*"
        )


def _divisors_near(n: int, k: int) -> list[int]:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(divs, key=lambda d: abs(d - k))[:3]


# --------------------------------------------------------------------------------------------
# Command line: the launcher's check before torchrun starts (no process group, no GPU)


def split_config_argument(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """``CONFIG k=v ...`` or just ``k=v ...``: a first argument with '=' that is no file is an override."""
    if config and "=" in config and not Path(config).exists():
        return None, [config, *overrides]
    return config, list(overrides)


def describe_job(cfg: Config, world_size: int) -> str:
    """The resolved config, the world layout, the batch arithmetic and the parameter count."""
    from dense_model.model import count_parameters

    t, p = cfg.training, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = world_size // (tp * pp)
    iters, warmup = train_and_warmup_steps(cfg)
    tokens_per_step = t.global_batch_size * cfg.model.seq_length
    params = count_parameters(cfg.model)
    layout = (
        f"world {world_size} = TP {tp} x PP {pp} x DP {dp} | micro-batches per step "
        f"{t.global_batch_size // (t.micro_batch_size * dp)} of {t.micro_batch_size} per DP rank | "
        f"{tokens_per_step:,} tokens per step | {iters:,} steps ({warmup:,} warm-up), "
        f"{iters * tokens_per_step:,} tokens | {params['total']:,} parameters "
        f"({params['non_embedding']:,} without embeddings)"
    )
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False) + layout


def main(argv: list[str] | None = None) -> int:
    """``python -m dense_model.config [CONFIG] [k=v ...] [--world-size N] [--dry-run] [--check-run-dir]``:
    exit 2 with a one-line message if the config cannot run; 0 otherwise."""
    import argparse

    parser = argparse.ArgumentParser(description="Check a training config before launching it.")
    parser.add_argument("config", nargs="?", help="YAML config (default: the built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--world-size", type=int, default=None, help="processes the job will run")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved job and exit")
    parser.add_argument(
        "--check-run-dir", action="store_true", help="also fail if another job holds the run directory"
    )
    args = parser.parse_intermixed_args(argv)
    config, overrides = split_config_argument(args.config, args.overrides)
    try:
        cfg = load_config(config, overrides)
        validate(cfg, world_size=args.world_size)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.check_run_dir:
        try:
            check_free(cfg.run_dir)
        except RunDirBusy as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if args.dry_run:
        print(describe_job(cfg, args.world_size or 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
