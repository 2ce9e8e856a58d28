"""Statistics of cross-validation scores: intervals, tests between two runs, McNemar's test on paired predictions.

Folds are not independent samples: any two share most of their training data, so a plain t interval is too narrow
and a plain t-test finds differences that are not there. Nadeau & Bengio (2003) widen the variance of the mean by
n_val / n_train to make up for it; Corani & Benavoli (2015) give the Bayesian counterpart. Formulas only, over numpy
and scipy.special (scipy.stats takes about a second to import).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import bdtr, stdtr, stdtrit  # binomial CDF, Student's t CDF and quantile


@dataclass(frozen=True)
class TTest:
    mean: float  # mean difference (A - B)
    t: float
    p: float  # two-sided
    df: float


@dataclass(frozen=True)
class BayesianTest:
    p_a_better: float
    p_equivalent: float
    p_b_better: float


def t_interval(values, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, sample standard deviation, low, high) with Student's t, J-1 df; a single value has no spread."""
    count, mean, variance = _mean_and_variance(values)
    if count < 2:
        return mean, math.nan, math.nan, math.nan
    std = math.sqrt(variance)
    half = _t_quantile(count - 1, confidence) * std / math.sqrt(count)
    return mean, std, mean - half, mean + half


def corrected_interval(values, n_train: float, n_val: float, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Nadeau & Bengio's corrected resampled t interval over all R x k fold scores, with the mean
    training and validation sizes; fewer than 2 scores give (mean, nan, nan)."""
    count, mean, variance = _mean_and_variance(values)
    if count < 2:
        return mean, math.nan, math.nan
    half = _t_quantile(count - 1, confidence) * math.sqrt((1 / count + n_val / n_train) * variance)
    return mean, mean - half, mean + half


def corrected_paired_ttest(differences, n_train: float, n_val: float) -> TTest:
    """Nadeau & Bengio's corrected resampled paired t-test on per-fold differences A - B (same folds for both)."""
    count, mean, variance = _mean_and_variance(differences)
    if count < 2:
        raise ValueError("a paired t-test needs at least 2 differences")
    return _t_test(mean, (1 / count + n_val / n_train) * variance, float(count - 1))


def welch_ttest(a, b) -> TTest:
    """Unpaired Welch t-test of mean(a) - mean(b), with the Welch-Satterthwaite df (as scipy.stats.ttest_ind with
    equal_var=False). Two constant samples leave the df undefined (nan)."""
    count_a, mean_a, variance_a = _mean_and_variance(a)
    count_b, mean_b, variance_b = _mean_and_variance(b)
    if min(count_a, count_b) < 2:
        raise ValueError("Welch's t-test needs at least 2 values in each sample")
    variance_of_mean_a, variance_of_mean_b = variance_a / count_a, variance_b / count_b
    denominator = variance_of_mean_a**2 / (count_a - 1) + variance_of_mean_b**2 / (count_b - 1)
    df = (variance_of_mean_a + variance_of_mean_b) ** 2 / denominator if denominator > 0 else math.nan
    return _t_test(mean_a - mean_b, variance_of_mean_a + variance_of_mean_b, df)


def bayesian_correlated_ttest(differences, rho: float, rope: float) -> BayesianTest:
    """Corani & Benavoli's Bayesian correlated t-test on per-fold differences A - B, as baycomp's CorrelatedTTest.

    rho is the correlation between folds, n_val / n_total; rope is the half-width of the region of practical
    equivalence, in the metric's units. The posterior of the mean difference is Student's t with J-1 df, located at
    mean(d) with scale sqrt((1/J + rho/(1-rho)) * var(d)); constant differences make it a point mass at their value.
    Higher must be better: negate differences of a loss.
    """
    if not 0 <= rho < 1:
        raise ValueError(f"rho must be in [0, 1), got {rho}")
    if rope < 0:
        raise ValueError(f"rope must be non-negative, got {rope}")
    count, mean, variance = _mean_and_variance(differences)
    if count < 2:
        raise ValueError("a Bayesian correlated t-test needs at least 2 differences")
    if variance == 0:
        return BayesianTest(float(mean > rope), float(-rope <= mean <= rope), float(mean < -rope))
    scale = math.sqrt((1 / count + rho / (1 - rho)) * variance)
    below_rope = float(stdtr(count - 1, (-rope - mean) / scale))
    up_to_rope = float(stdtr(count - 1, (rope - mean) / scale))
    # the equivalent share as a difference of CDFs, so that a rope of 0 gives exactly 0
    return BayesianTest(1 - up_to_rope, up_to_rope - below_rope, below_rope)


def mcnemar_exact(correct_a, correct_b) -> tuple[int, int, float]:
    """McNemar's exact test on two models' per-sample correctness over the same samples: (samples only A gets right,
    samples only B gets right, two-sided p). With no discordant pair p is 1 (bdtr(0, 0, 0.5) = 1)."""
    correct_a, correct_b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if correct_a.shape != correct_b.shape:
        raise ValueError(f"paired predictions differ in shape: {correct_a.shape} and {correct_b.shape}")
    only_a = int((correct_a & ~correct_b).sum())
    only_b = int((~correct_a & correct_b).sum())
    p = min(1.0, 2 * float(bdtr(min(only_a, only_b), only_a + only_b, 0.5)))
    return only_a, only_b, p


def _mean_and_variance(values) -> tuple[int, float, float]:
    """Count, mean and sample variance (ddof=1; nan for one value). Equal values give their own value and exactly 0:
    a float mean's rounding would otherwise leave a spread of ~1e-34 and turn 'no spread' into a huge finite t."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if len(values) == 0:
        raise ValueError("no values")
    if (values == values[0]).all():
        return len(values), float(values[0]), 0.0 if len(values) > 1 else math.nan
    return len(values), float(values.mean()), float(values.var(ddof=1))


def _t_quantile(df: float, confidence: float) -> float:
    """The two-sided critical value: the (1 + confidence) / 2 quantile of Student's t."""
    return float(stdtrit(df, 0.5 + confidence / 2))


def _t_test(mean: float, variance_of_mean: float, df: float) -> TTest:
    if variance_of_mean == 0:  # every fold agrees: the sign is certain, unless there is no difference at all
        return TTest(mean, math.copysign(math.inf, mean), 0.0, df) if mean != 0 else TTest(mean, 0.0, 1.0, df)
    t = mean / math.sqrt(variance_of_mean)
    return TTest(mean, t, float(2 * stdtr(df, -abs(t))), df)
