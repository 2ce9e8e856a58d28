"""Precision, recall and F1 from a confusion matrix: numpy only, so a fold trainer imports no pandas or scipy."""

from __future__ import annotations

import numpy as np


def class_scores(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall and F1 from a confusion matrix (a class never predicted scores 0, as sklearn)."""
    true_positive = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, true_positive / predicted, 0.0)
        recall = np.where(actual > 0, true_positive / actual, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return precision, recall, f1


def macro_scores(confusion: np.ndarray) -> tuple[float, float, float]:
    """Macro precision, recall and F1 over the classes present."""
    precision, recall, f1 = class_scores(confusion)
    present = confusion.sum(axis=1) > 0
    return float(precision[present].mean()), float(recall[present].mean()), float(f1[present].mean())


def log_loss(labels, probabilities, eps: float = 1e-15) -> float:
    """Mean negative log of the true class's probability (labels: ints (N,), probabilities: (N, C)), clipped to
    [eps, 1] so that a confident mistake costs -log(eps) rather than infinity."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    true_class = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(true_class, eps, 1.0)).mean())


def expected_calibration_error(labels, probabilities, bins: int = 15) -> float:
    """Top-label ECE (Guo et al. 2017): the confidence is the top probability and the prediction its class; over
    equal-width bins ((m-1)/M, m/M], the sum of |bin|/N * |accuracy(bin) - mean confidence(bin)|."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    # linspace's edges, as in Guo et al.'s code; right=True closes each bin on the right, and 0 joins the first bin
    edges = np.linspace(0.0, 1.0, bins + 1)
    bin_of = np.digitize(confidence, edges[1:-1], right=True)
    # |bin|/N * |accuracy - mean confidence| is |sum(correct) - sum(confidence)| / N over the bin
    gap = np.bincount(bin_of, weights=correct - confidence, minlength=bins)
    return float(np.abs(gap).sum() / len(confidence))
