"""The small checks every config section uses: ConfigError and the number and split checks.

The bottom of the config package: imports nothing from dense_model.
"""

from __future__ import annotations

import math


class ConfigError(ValueError):
    """A config that cannot work; the message names the field and the fix."""


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


def check_split(split: str) -> None:
    fix = 'write it as train,valid,test parts, e.g. "969,30,1"'
    parts = str(split).replace("/", ",").split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"data.split={split!r} is not a list of numbers; {fix}") from None
    if len(values) > 3 or not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
        raise ConfigError(f"data.split={split!r}: at most 3 finite parts >= 0 with a positive sum; {fix}")


def divisors_near(n: int, k: int) -> list[int]:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(divs, key=lambda d: abs(d - k))[:3]
