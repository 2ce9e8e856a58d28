"""Stratified, shuffled, seeded K-fold splits: the same folds as scikit-learn's StratifiedKFold."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedKFold

from distml.errors import DistmlError


def check_k(labels: np.ndarray, k: int) -> None:
    """k must be at least 2 and no larger than the smallest class, or some fold lacks that class."""
    if k < 2:
        raise DistmlError(f"must be at least 2, got {k}", option="--k")
    counts = np.bincount(labels)
    smallest = int(counts[counts > 0].min())
    if k > smallest:
        raise DistmlError(f"{k} folds but the smallest class has only {smallest} images", option="--k")


def fold_assignment(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The validation fold (0..k-1) of every image, from StratifiedKFold(k, shuffle=True, random_state=seed)."""
    check_k(labels, k)
    assignment = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, val_index) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        assignment[val_index] = fold
    return assignment


def fold_indices(assignment: np.ndarray, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, validation indices) of one fold, both sorted."""
    is_val = assignment == fold
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)
