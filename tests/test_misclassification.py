"""The Rogan-Gladen correction against its formula, and its interval's coverage by simulation."""

import numpy as np
import pytest

from emsweep.misclassification import JudgeError, corrected_rate, resolves


def test_the_corrected_rate_is_the_formula_clipped_to_0_1():
    error = JudgeError(tp=60, positives=100, fp=10, negatives=100)
    rate = corrected_rate(26, 100, error)
    assert rate.resolves and rate.value == pytest.approx((0.26 - 0.1) / (0.6 - 0.1))
    assert rate.low < rate.value < rate.high
    assert corrected_rate(5, 100, error).value == 0.0  # below the false-positive floor
    assert corrected_rate(90, 100, error).value == 1.0
    # An interval that carries the judge's error is wider than one that would not (a huge reference).
    sharp = corrected_rate(26, 100, JudgeError(60_000, 100_000, 10_000, 100_000))
    assert (rate.high - rate.low) > (sharp.high - sharp.low)


def test_a_judge_no_better_than_chance_does_not_resolve():
    ok, low = resolves(JudgeError(tp=6, positives=60, fp=10, negatives=100))
    assert not ok and low < 0
    rate = corrected_rate(10, 100, JudgeError(tp=6, positives=60, fp=10, negatives=100))
    assert np.isnan(rate.value) and np.isnan(rate.low) and not rate.resolves


@pytest.mark.parametrize("theta", [0.05, 0.3])
def test_the_interval_covers_the_true_rate(theta):
    """Simulated judges with TPR 0.6 and FPR 0.05, measured on 100 + 300 reference answers, rating
    200 answers whose true misaligned share is theta: the 95% interval covers theta in 0.95 +- 0.05
    of 300 repetitions (it is a little conservative, from the Jeffreys draws)."""
    rng = np.random.default_rng(1)
    covered = 0
    repeats = 300
    for index in range(repeats):
        error = JudgeError(int(rng.binomial(100, 0.6)), 100, int(rng.binomial(300, 0.05)), 300)
        truly = rng.binomial(200, theta)
        flagged = rng.binomial(truly, 0.6) + rng.binomial(200 - truly, 0.05)
        rate = corrected_rate(int(flagged), 200, error, seed=index)
        covered += rate.low <= theta <= rate.high
    assert 0.90 <= covered / repeats <= 1.0
