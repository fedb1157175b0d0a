"""The study statistics against scipy and a hand computation on fixed numbers."""

import math
import statistics

import pytest
from scipy import stats

from dense_model.studies.stats import mean_std, paired_difference

# Final validation losses of two activations over 5 seeds (made-up but study-like numbers).
A = [3.136, 3.151, 3.129, 3.142, 3.147]
B = [3.177, 3.169, 3.181, 3.160, 3.175]


def test_mean_std_is_the_sample_standard_deviation():
    mean, std = mean_std(A)
    assert mean == pytest.approx(statistics.fmean(A), abs=1e-12)
    assert std == pytest.approx(statistics.stdev(A), abs=1e-12)
    assert math.isnan(mean_std([1.0])[1])


def test_paired_difference_matches_scipy_ttest_rel():
    diff = paired_difference(A, B)
    ref = stats.ttest_rel(A, B)
    ci = ref.confidence_interval(0.95)
    assert diff.n == 5
    assert diff.mean == pytest.approx(statistics.fmean([a - b for a, b in zip(A, B)]), abs=1e-12)
    assert diff.ci_low == pytest.approx(ci.low, abs=1e-12)
    assert diff.ci_high == pytest.approx(ci.high, abs=1e-12)
    assert diff.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert diff.excludes_zero and diff.ci_high < 0


def test_paired_difference_by_hand_for_three_seeds():
    # d = (-0.02, -0.01, 0.0): mean -0.01, sd 0.01, t_{0.975, 2} = 4.302652729911275
    diff = paired_difference([1.00, 2.00, 3.00], [1.02, 2.01, 3.00])
    half = 4.302652729911275 * 0.01 / math.sqrt(3)
    assert diff.mean == pytest.approx(-0.01, abs=1e-12)
    assert diff.std == pytest.approx(0.01, abs=1e-12)
    assert (diff.ci_low, diff.ci_high) == pytest.approx((-0.01 - half, -0.01 + half), abs=1e-12)
    assert not diff.excludes_zero  # the interval [-0.0348, 0.0148] holds 0


def test_pairing_matters_and_bad_input_is_refused():
    # A shared seed effect cancels in the paired difference: unpaired noise is large, pairs agree.
    base = [3.0, 3.5, 2.5, 3.2]
    better = [x - 0.01 for x in base]
    diff = paired_difference(better, base)
    assert diff.excludes_zero and diff.ci_high < 0
    unpaired = stats.ttest_ind(better, base)
    assert unpaired.pvalue > 0.5  # the same numbers without pairing show nothing
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1.0, 2.0], [1.0])
