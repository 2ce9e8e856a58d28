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
