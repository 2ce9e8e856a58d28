"""The statistics formulas against arithmetic worked in the comments, then against scipy.stats.

Most cases use the differences [0.01, 0.02, 0.03] with n_train 80 and n_val 20 (rho = 20 / 100 = 0.2): mean 0.02,
var(ddof=1) = (0.01^2 + 0 + 0.01^2) / 2 = 1e-4, and the corrected factor 1/3 + 20/80 = 7/12 (= 1/J + rho/(1-rho)), so
the corrected variance of the mean is 7e-4/12 and its standard error 0.0076376. With df = 2, Student's t has a closed
form: CDF(x) = 1/2 + x / (2 sqrt(x^2 + 2)), quantile(q) = (2q - 1) / sqrt(2q(1 - q)).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from distml.stats import (
    BayesianTest,
    bayesian_correlated_ttest,
    corrected_interval,
    corrected_paired_ttest,
    mcnemar_exact,
    t_interval,
    welch_ttest,
)

DIFFERENCES = [0.01, 0.02, 0.03]
STANDARD_ERROR = math.sqrt(7e-4 / 12)
T_975_DF2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # the df=2 quantile: 4.302653


def test_t_interval_is_mean_std_and_students_t():
    mean, std, low, high = t_interval([0.90, 0.92, 0.94])
    assert mean == pytest.approx(0.92)
    assert std == pytest.approx(0.02)
    half = T_975_DF2 * 0.02 / math.sqrt(3)  # 0.049683
    assert (low, high) == (pytest.approx(0.92 - half), pytest.approx(0.92 + half))
    assert (low, high) == pytest.approx(scipy.stats.t.interval(0.95, 2, loc=0.92, scale=0.02 / math.sqrt(3)))


def test_t_interval_follows_the_confidence():
    _, _, low, high = t_interval([0.90, 0.92, 0.94], confidence=0.5)
    half = scipy.stats.t.ppf(0.75, 2) * 0.02 / math.sqrt(3)  # 0.816497 * 0.011547 = 0.009428
    assert (low, high) == (pytest.approx(0.92 - half), pytest.approx(0.92 + half))


def test_t_interval_of_a_single_value_has_no_spread_and_of_equal_values_no_width():
    mean, std, low, high = t_interval([0.5])
    assert mean == 0.5 and math.isnan(std) and math.isnan(low) and math.isnan(high)
    # 0.123456 * 5 / 5 rounds: numpy's var would be 2.4e-34, not 0
    assert t_interval([0.123456] * 5) == (0.123456, 0.0, 0.123456, 0.123456)


def test_corrected_interval_widens_the_standard_error_by_n_val_over_n_train():
    mean, low, high = corrected_interval(DIFFERENCES, n_train=80, n_val=20)
    half = T_975_DF2 * STANDARD_ERROR  # 4.302653 * 0.0076376 = 0.032862
    assert mean == pytest.approx(0.02)
    assert (low, high) == (pytest.approx(0.02 - half), pytest.approx(0.02 + half))
    assert half == pytest.approx(0.032862, abs=1e-6)
    assert (low, high) == pytest.approx(scipy.stats.t.interval(0.95, 2, loc=0.02, scale=STANDARD_ERROR))
    # the uncorrected half-width is 4.302653 * sqrt(1e-4 / 3) = 0.024842: narrower by sqrt(7/4)
    _, _, plain_low, plain_high = t_interval(DIFFERENCES)
    assert (high - low) / (plain_high - plain_low) == pytest.approx(math.sqrt(7 / 4))


def test_corrected_interval_edge_cases():
    mean, low, high = corrected_interval([0.7], n_train=80, n_val=20)
    assert mean == 0.7 and math.isnan(low) and math.isnan(high)
    assert corrected_interval([0.123456] * 4, n_train=80, n_val=20) == (0.123456, 0.123456, 0.123456)


def test_corrected_paired_ttest_by_hand_and_against_scipy():
    result = corrected_paired_ttest(DIFFERENCES, n_train=80, n_val=20)
    # t = 0.02 / 0.0076376 = 2.618615, t^2 = 4e-4 * 12 / 7e-4 = 48/7;
    # p = 2 (1 - CDF(t)) = 1 - t / sqrt(t^2 + 2) = 1 - sqrt(48/62) = 0.120117
    assert result.mean == pytest.approx(0.02)
    assert result.t == pytest.approx(math.sqrt(48 / 7))
    assert result.t == pytest.approx(2.618615, abs=1e-6)
    assert result.df == 2.0
    assert result.p == pytest.approx(1 - math.sqrt(48 / 62))
    assert result.p == pytest.approx(0.120117, abs=1e-6)
    assert result.p == pytest.approx(2 * scipy.stats.t.sf(math.sqrt(48 / 7), 2))
    # uncorrected, the same differences look significant-ish: t = 0.02 / sqrt(1e-4/3) = 3.4641, p = 0.0742
    plain = scipy.stats.ttest_1samp(DIFFERENCES, 0.0)
    assert plain.statistic == pytest.approx(math.sqrt(12)) and plain.pvalue < result.p


def test_corrected_paired_ttest_is_symmetric_in_a_and_b():
    result = corrected_paired_ttest([-d for d in DIFFERENCES], n_train=80, n_val=20)
    assert (result.mean, result.t) == (pytest.approx(-0.02), pytest.approx(-math.sqrt(48 / 7)))
    assert result.p == pytest.approx(1 - math.sqrt(48 / 62))


def test_corrected_paired_ttest_with_zero_variance_or_one_difference():
    assert corrected_paired_ttest([0.123456] * 5, n_train=80, n_val=20).t == math.inf
    below = corrected_paired_ttest([-0.01] * 3, n_train=80, n_val=20)
    assert (below.mean, below.t, below.p, below.df) == (-0.01, -math.inf, 0.0, 2.0)
    tied = corrected_paired_ttest([0.0] * 3, n_train=80, n_val=20)
    assert (tied.t, tied.p) == (0.0, 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        corrected_paired_ttest([0.01], n_train=80, n_val=20)


def test_welch_ttest_by_hand_and_against_scipy():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0]
    result = welch_ttest(a, b)
    # var(a) = 5/3, /4 = 5/12; var(b) = 4, /3 = 16/12; se^2 = 21/12 = 1.75
    # t = (2.5 - 4) / sqrt(1.75) = -1.133893; df = 1.75^2 / ((5/12)^2 / 3 + (4/3)^2 / 2) = 3.0625 / 0.946759 = 3.234719
    assert result.mean == pytest.approx(-1.5)
    assert result.t == pytest.approx(-1.5 / math.sqrt(1.75))
    assert result.df == pytest.approx(1.75**2 / ((5 / 12) ** 2 / 3 + (4 / 3) ** 2 / 2))
    assert result.df == pytest.approx(3.234719, abs=1e-6)
    assert result.p == pytest.approx(2 * scipy.stats.t.sf(1.5 / math.sqrt(1.75), result.df))
    reference = scipy.stats.ttest_ind(a, b, equal_var=False)
    assert (result.t, result.p, result.df) == pytest.approx((reference.statistic, reference.pvalue, reference.df))


def test_welch_ttest_matches_scipy_on_unequal_samples():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.80, 0.02, size=5), rng.normal(0.78, 0.05, size=10)
    result, reference = welch_ttest(a, b), scipy.stats.ttest_ind(a, b, equal_var=False)
    assert (result.t, result.p, result.df) == pytest.approx((reference.statistic, reference.pvalue, reference.df))


def test_welch_ttest_edge_cases():
    apart = welch_ttest([0.9] * 3, [0.8] * 4)
    assert (apart.t, apart.p) == (math.inf, 0.0) and math.isnan(apart.df)
    same = welch_ttest([0.9] * 3, [0.9] * 4)
    assert (same.t, same.p) == (0.0, 1.0)
    # one constant sample: df = (var_b/n_b)^2 / ((var_b/n_b)^2 / (n_b - 1)) = n_b - 1
    assert welch_ttest([0.9] * 3, [0.1, 0.2, 0.3, 0.4]).df == pytest.approx(3.0)
    with pytest.raises(ValueError, match="at least 2"):
        welch_ttest([0.9], [0.8, 0.7])


def test_bayesian_correlated_ttest_by_hand():
    result = bayesian_correlated_ttest(DIFFERENCES, rho=0.2, rope=0.01)
    # posterior t(df=2, loc 0.02, scale 0.0076376), the corrected standard error since rho/(1-rho) = 20/80
    # P(A better) = P(diff > 0.01) = CDF(0.01 / scale), x^2 = 1e-4 * 12 / 7e-4 = 12/7 -> 1/2 + sqrt(12/26) / 2
    # P(B better) = P(diff < -0.01) = CDF(-0.03 / scale), x^2 = 108/7 -> 1/2 - sqrt(108/122) / 2
    p_a_better = 0.5 + math.sqrt(12 / 26) / 2  # 0.839683
    p_b_better = 0.5 - math.sqrt(108 / 122) / 2  # 0.029562
    assert result.p_a_better == pytest.approx(p_a_better)
    assert result.p_b_better == pytest.approx(p_b_better)
    assert result.p_equivalent == pytest.approx(1 - p_a_better - p_b_better)
    assert (result.p_a_better, result.p_equivalent, result.p_b_better) == pytest.approx(
        (0.839683, 0.130755, 0.029562), abs=1e-6
    )


def test_bayesian_correlated_ttest_against_scipy_t():
    differences = [0.012, -0.004, 0.020, 0.008, 0.015, 0.001, 0.009, 0.011, -0.002, 0.018]
    rho, rope = 0.1, 0.005
    posterior = scipy.stats.t(
        df=9, loc=np.mean(differences), scale=math.sqrt((1 / 10 + rho / (1 - rho)) * np.var(differences, ddof=1))
    )
    result = bayesian_correlated_ttest(differences, rho=rho, rope=rope)
    assert result.p_b_better == pytest.approx(posterior.cdf(-rope))
    assert result.p_equivalent == pytest.approx(posterior.cdf(rope) - posterior.cdf(-rope))
    assert result.p_a_better == pytest.approx(posterior.sf(rope))


def test_bayesian_correlated_ttest_without_a_rope_halves_the_corrected_p():
    result = bayesian_correlated_ttest(DIFFERENCES, rho=0.2, rope=0.0)
    # P(B better) = CDF(-0.02 / scale) = 1/2 - sqrt(48/62) / 2 = 0.060058: the corrected t-test's one-sided p
    assert result.p_equivalent == 0.0
    assert result.p_b_better == pytest.approx(0.5 - math.sqrt(48 / 62) / 2)
    assert result.p_b_better == pytest.approx(corrected_paired_ttest(DIFFERENCES, n_train=80, n_val=20).p / 2)
    assert result.p_a_better == pytest.approx(0.5 + math.sqrt(48 / 62) / 2)


def test_bayesian_correlated_ttest_with_zero_variance_is_a_point_mass():
    assert bayesian_correlated_ttest([0.02] * 3, rho=0.2, rope=0.01) == BayesianTest(1.0, 0.0, 0.0)
    assert bayesian_correlated_ttest([0.005] * 3, rho=0.2, rope=0.01) == BayesianTest(0.0, 1.0, 0.0)
    assert bayesian_correlated_ttest([-0.02] * 3, rho=0.2, rope=0.01) == BayesianTest(0.0, 0.0, 1.0)
    assert bayesian_correlated_ttest([0.01] * 3, rho=0.2, rope=0.01) == BayesianTest(0.0, 1.0, 0.0)  # edge included
    assert bayesian_correlated_ttest([0.0] * 3, rho=0.2, rope=0.0) == BayesianTest(0.0, 1.0, 0.0)


def test_bayesian_correlated_ttest_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least 2"):
        bayesian_correlated_ttest([0.01], rho=0.2, rope=0.01)
    with pytest.raises(ValueError, match="rho"):
        bayesian_correlated_ttest(DIFFERENCES, rho=1.0, rope=0.01)
    with pytest.raises(ValueError, match="rope"):
        bayesian_correlated_ttest(DIFFERENCES, rho=0.2, rope=-0.01)


def test_mcnemar_exact_by_hand_and_against_scipy():
    correct_a = [1, 1, 1, 1, 1, 0, 1, 1, 0, 0]
    correct_b = [0, 0, 0, 0, 0, 1, 1, 1, 0, 0]
    # only A right: 5 (samples 0-4), only B right: 1 (sample 5), n = 6
    # p = 2 * P(X <= 1; 6, 0.5) = 2 * (1 + 6) / 64 = 0.21875
    assert mcnemar_exact(correct_a, correct_b) == (5, 1, pytest.approx(0.21875))
    assert mcnemar_exact(correct_b, correct_a) == (1, 5, pytest.approx(0.21875))
    assert mcnemar_exact(correct_a, correct_b)[2] == pytest.approx(scipy.stats.binomtest(1, 6, 0.5).pvalue)
    # 10 to 0: p = 2 / 2^10 = 0.001953125
    assert mcnemar_exact([True] * 10, [False] * 10) == (10, 0, pytest.approx(2 / 1024))


def test_mcnemar_exact_caps_p_at_one_and_gives_one_without_discordant_pairs():
    # 2 to 2: 2 * P(X <= 2; 4, 0.5) = 2 * 11/16 > 1
    assert mcnemar_exact([1, 1, 0, 0, 1], [0, 0, 1, 1, 1]) == (2, 2, 1.0)
    assert scipy.stats.binomtest(2, 4, 0.5).pvalue == 1.0
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="shape"):
        mcnemar_exact([1, 0], [1, 0, 1])
