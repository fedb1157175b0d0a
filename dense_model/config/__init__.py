"""The typed config: nested dataclasses, loaded from YAML with dotted ``key=value`` overrides.

    cfg = load_config("configs/1b/polynorm.yaml", ["model.activation=polyrelu", "training.lr=2e-4"])
    validate(cfg, world_size=32)   # before any process group exists; raises ConfigError

Split by what it does (each file reads at once):
  checks.py   ConfigError and the number checks every section uses
  schema.py   the sections (dataclasses), every field with a one-line docstring (the string after
              it), each section's own ``validate()`` (ranges, files)
  derived.py  values computed from the config (FFN widths, padded vocabulary, step counts)
  loading.py  YAML, the ``base:`` chain (a file names a base, relative to itself, whose values it
              overrides), dotted overrides, type checks (unknown keys and wrong types rejected)
  rules.py    ``validate()``: every section's, then the settings that span sections (hidden not
              divisible by heads, FFN width not divisible by TP, warm-up not shorter than training, ...)
Every message names the field's dotted name and the fix. The check before launch (world size,
run directory, ``--dry-run``) is ``dense_model.launcher``, above training
(``python -m dense_model.launcher``).
"""

from dense_model.config.checks import ConfigError, fraction, non_negative, positive
from dense_model.config.derived import (
    expert_ffn_hidden_size,
    expert_tensor_parallel_size,
    ffn_hidden_size,
    moe_enabled,
    padded_vocab_size,
    train_and_warmup_steps,
    warmup_tokens,
)
from dense_model.config.loading import (
    config_from_dict,
    config_to_dict,
    load_config,
    parse_overrides,
    read_yaml_mapping,
    save_config,
    split_config_argument,
)
from dense_model.config.rules import resolve_vocab_size, validate
from dense_model.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    TrainingConfig,
    sections,
)

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "MoEConfig",
    "ParallelConfig",
    "TrainingConfig",
    "config_from_dict",
    "config_to_dict",
    "expert_ffn_hidden_size",
    "expert_tensor_parallel_size",
    "ffn_hidden_size",
    "fraction",
    "load_config",
    "moe_enabled",
    "non_negative",
    "padded_vocab_size",
    "parse_overrides",
    "positive",
    "read_yaml_mapping",
    "resolve_vocab_size",
    "save_config",
    "sections",
    "split_config_argument",
    "train_and_warmup_steps",
    "warmup_tokens",
    "validate",
]
