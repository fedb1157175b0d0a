"""dense_model.data.repetition: OLMo's repetition filter finds planted repeats as a brute-force count does."""

from __future__ import annotations

import numpy as np
import pytest

from dense_model.data.repetition import is_repetitive, max_repeats

SEED = dict(min_period=1, max_period=13, max_count=32)  # the seed's data.instance_filter


def _reference_repeats(tokens: list[int], period: int) -> int:
    """Straightforwardly: from every start, how many whole copies of tokens[start:start+period] follow
    one another."""
    best = 1
    for start in range(len(tokens) - period + 1):
        unit, times = tokens[start : start + period], 1
        while tokens[start + times * period : start + (times + 1) * period] == unit:
            times += 1
        best = max(best, times)
    return best


def _planted(rng, period: int, times: int, length: int = 512, extra: int = 0) -> np.ndarray:
    """Random ids (from a big vocabulary: chance repeats are negligible) with `times` copies (plus
    `extra` tokens of one more) of a random period-`period` unit planted at a random place."""
    unit = rng.integers(100, 50000, period)
    while period > 1 and any(
        len(set(unit[i::q])) == 1 for q in range(1, period) if period % q == 0 for i in range(q)
    ):
        unit = rng.integers(100, 50000, period)  # a unit with a shorter period would be counted as that
    block = np.concatenate([np.tile(unit, times), unit[:extra]])
    at = int(rng.integers(0, length - len(block)))
    out = rng.integers(100, 50000, length)
    out[at : at + len(block)] = block
    return out


@pytest.mark.parametrize("period", [1, 7, 13])
@pytest.mark.parametrize("times,extra", [(31, 0), (31, 5), (32, 0), (33, 3)])
def test_planted_repeats_against_the_reference(period, times, extra):
    rng = np.random.default_rng(period * 100 + times)
    extra = min(extra, period - 1)
    tokens = _planted(rng, period, times, extra=extra)
    assert max_repeats(tokens, period) == _reference_repeats(tokens.tolist(), period) == times
    assert is_repetitive(tokens, **SEED) == (times >= 32)


def test_random_samples_agree_with_the_reference_for_every_period():
    rng = np.random.default_rng(0)
    for _ in range(30):
        tokens = rng.integers(0, 3, int(rng.integers(20, 120)))  # small vocabulary: many chance repeats
        for p in range(1, 14):
            assert max_repeats(tokens, p) == _reference_repeats(tokens.tolist(), p), (tokens.tolist(), p)


def test_periods_outside_the_range_do_not_count():
    tokens = _planted(np.random.default_rng(5), 14, 33, length=1024)
    assert not is_repetitive(tokens, **SEED)  # period 14 > max_period 13
    assert is_repetitive(tokens, min_period=1, max_period=14, max_count=32)
