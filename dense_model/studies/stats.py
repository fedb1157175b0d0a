"""Statistics of a study: mean and spread over seeds, and paired differences with a t interval.

Runs of two activations that share a seed share the data order (and, seed_mode permitting, the
initialisation of every weight outside the MLP), so their difference is less noisy than either
loss: the comparison is the paired t interval over the seeds both activations finished.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


@dataclass
class PairedDifference:
    """a - b over paired seeds: mean, its 95% paired-t interval, and the two-sided p value."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    p_value: float

    @property
    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.ci_low > 0 or self.ci_high < 0)

    def to_dict(self) -> dict:
        return {**asdict(self), "excludes_zero": self.excludes_zero}


def paired_difference(a: list[float], b: list[float], confidence: float = 0.95) -> PairedDifference:
    """Paired t: d_i = a_i - b_i, mean(d) +- t_{(1+c)/2, n-1} * sd(d) / sqrt(n)."""
    from scipy.stats import t as student_t

    if len(a) != len(b) or not a:
        raise ValueError(
            f"paired_difference needs two equally long, non-empty lists, got {len(a)} and {len(b)}"
        )
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean, std = mean_std(d)
    if n < 2:
        return PairedDifference(n, mean, std, float("nan"), float("nan"), float("nan"))
    sem = std / math.sqrt(n)
    half = float(student_t.ppf((1 + confidence) / 2, n - 1)) * sem
    if sem == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * student_t.sf(abs(mean) / sem, n - 1))
    return PairedDifference(n, mean, std, mean - half, mean + half, p)
