"""Loading: YAML (with its ``base:`` chain) <- dotted ``key=value`` overrides, types checked.

Unknown keys and wrong types are rejected here, each message naming the dotted field.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from dense_model.config.checks import ConfigError
from dense_model.config.schema import Config


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


def split_config_argument(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """``CONFIG k=v ...`` or just ``k=v ...``: a first argument with '=' that is no file is an override."""
    if config and "=" in config and not Path(config).exists():
        return None, [config, *overrides]
    return config, list(overrides)
