"""Out-of-fold scores on hand-checked predictions: log loss (against sklearn) and expected calibration error."""

from __future__ import annotations

import math

import pytest
import sklearn.metrics

from distml.scores import expected_calibration_error, log_loss


def test_log_loss_by_hand_and_against_sklearn():
    labels = [0, 1, 2]
    probabilities = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]
    # -(ln 0.7 + ln 0.8 + ln 0.4) / 3 = (0.356675 + 0.223144 + 0.916291) / 3 = 0.498703
    assert log_loss(labels, probabilities) == pytest.approx(-(math.log(0.7) + math.log(0.8) + math.log(0.4)) / 3)
    assert log_loss(labels, probabilities) == pytest.approx(0.498703, abs=1e-6)
    assert log_loss(labels, probabilities) == pytest.approx(sklearn.metrics.log_loss(labels, probabilities))


def test_log_loss_clips_a_zero_probability_for_the_true_class():
    assert log_loss([0], [[0.0, 1.0]]) == pytest.approx(-math.log(1e-15))  # 34.538776
    # a certain, right answer costs nothing, so the mean of the two is half the clipped cost
    assert log_loss([0, 1], [[0.0, 1.0], [0.0, 1.0]]) == pytest.approx(-math.log(1e-15) / 2)
    # eps=0.1 lifts the 0 to 0.1 and leaves 0.5 as it is: (-ln 0.1 - ln 0.5) / 2 = 1.497866
    assert log_loss([0, 1], [[0.0, 1.0], [0.5, 0.5]], eps=0.1) == pytest.approx(-(math.log(0.1) + math.log(0.5)) / 2)


def test_expected_calibration_error_by_hand():
    labels = [0, 1, 1, 0]
    probabilities = [[0.9, 0.1], [0.92, 0.08], [0.35, 0.65], [0.3, 0.7]]
    # confidences 0.9 (right), 0.92 (wrong), 0.65 (right), 0.7 (wrong); with 15 bins of width 1/15:
    # 0.9 and 0.92 share (13/15, 14/15]: 2/4 * |1/2 - 0.91| = 0.205
    # 0.65 in (9/15, 10/15]: 1/4 * |1 - 0.65| = 0.0875; 0.7 in (10/15, 11/15]: 1/4 * |0 - 0.7| = 0.175
    assert expected_calibration_error(labels, probabilities) == pytest.approx(0.205 + 0.0875 + 0.175)
    # one bin: |accuracy - mean confidence| = |2/4 - 3.17/4| = 0.2925
    assert expected_calibration_error(labels, probabilities, bins=1) == pytest.approx(0.2925)


def test_expected_calibration_error_of_confident_right_answers_is_zero():
    assert expected_calibration_error([0, 1, 2], [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]) == 0.0


def test_expected_calibration_error_closes_bins_on_the_right():
    labels = [0, 0]
    probabilities = [[0.5, 0.5], [0.4, 0.6]]
    # 4 bins with exact edges 0.25, 0.5, 0.75: 0.5 (right: argmax is class 0) falls in (0.25, 0.5] and 0.6 (wrong)
    # in (0.5, 0.75]: 1/2 * |1 - 0.5| + 1/2 * |0 - 0.6| = 0.55 (sharing a bin would give |1/2 - 0.55| = 0.05)
    assert expected_calibration_error(labels, probabilities, bins=4) == pytest.approx(0.55)


def test_expected_calibration_error_puts_a_confidence_of_zero_in_the_first_bin():
    labels = [0, 1]
    probabilities = [[0.0, 0.0], [0.3, 0.1]]
    # 2 bins: confidences 0 (argmax 0: right) and 0.3 (wrong) share [0, 0.5]: |1/2 - 0.15| = 0.35
    # (dropping the 0 would give 1/2 * 0.3 = 0.15; a bin of its own 1/2 * 1 + 1/2 * 0.3 = 0.65)
    assert expected_calibration_error(labels, probabilities, bins=2) == pytest.approx(0.35)
