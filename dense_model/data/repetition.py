"""OLMo's instance filter: a training sample that repeats a short token sequence too often.

OLMo (`data.instance_filter` in the seed's OLMoE config: repetition_min_period 1,
repetition_max_period 13, repetition_max_count 32) drops such an instance from the loss: it is
still read and run through the model, but its labels are all ignored. The definition, as OLMo's
`find_periodic_sequences`: for a period p in [min_period, max_period] (at most a third of the
sample), a span of tokens in which every token equals the one p before it is a sequence of period p
repeated floor(span length / p) times; the sample is filtered if any such count is >= max_count.
(OLMo finds the spans by reshaping into rows of p; here by comparing the sample with itself shifted
by p, which gives the same maximal spans.)
"""

from __future__ import annotations

import numpy as np


def max_repeats(tokens: np.ndarray, period: int) -> int:
    """The most times any period-`period` sequence repeats back to back in `tokens` [n]."""
    n = tokens.shape[0]
    if period >= n:
        return 1
    same = tokens[period:] == tokens[:-period]  # [n - p]: token i + p equals token i
    if not same.any():
        return 1
    # Longest run of True: positions where a run starts and ends, from the padded differences.
    edges = np.diff(np.concatenate(([0], same.view(np.int8), [0])))
    run = int((np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).max())
    return (run + period) // period  # the span is the run plus the first period


def is_repetitive(tokens: np.ndarray, min_period: int, max_period: int, max_count: int) -> bool:
    """True if `tokens` [n] holds a sequence of period min..max repeated at least `max_count` times."""
    tokens = np.asarray(tokens)
    top = min(max_period, tokens.shape[0] // 3)
    return any(max_repeats(tokens, p) >= max_count for p in range(min_period, top + 1))
