"""The only splitter: stratified, shuffled, seeded K folds (the same as scikit-learn's StratifiedKFold), a
validation holdout, subsets for quick runs, and SplitData, what every trainer reads."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distml.config import check_val_fraction
from distml.errors import DistmlError


@dataclass(frozen=True)
class SplitData:
    """Inputs, labels and the validation fold of every example: what every trainer reads, put in Ray's object store
    once (trainers on the same node read the arrays zero-copy). A holdout is two folds, fold 1 validating."""

    inputs: np.ndarray  # float32: images (N, C, H, W), tabular (N, F), or (N, 512) backbone features
    labels: np.ndarray  # int64 (N,)
    assignment: np.ndarray  # int64 (N,), the validation fold of each example
    test_inputs: np.ndarray | None = None  # a test set kept out of every fold, that each fold model is scored on
    test_labels: np.ndarray | None = None

    def indices(self, fold: int) -> tuple[np.ndarray, np.ndarray]:
        """(training indices, validation indices) of `fold`, both sorted."""
        return fold_indices(self.assignment, fold)

    @property
    def train_size(self) -> int:
        """Of a holdout: the examples that train."""
        return int((self.assignment == 0).sum())

    @property
    def val_size(self) -> int:
        """Of a holdout: the examples that validate."""
        return int((self.assignment == 1).sum())


def check_k(labels: np.ndarray, k: int, classes: tuple | None = None, noun: str = "images") -> None:
    """k must be at least 2 and no larger than the smallest class, or some fold lacks that class (named, when
    `classes` gives the label values)."""
    if k < 2:
        raise DistmlError(f"must be at least 2, got {k}", option="--k")
    counts = np.bincount(labels)
    present = np.flatnonzero(counts)
    smallest = int(present[np.argmin(counts[present])])
    if k > counts[smallest]:
        name = f" (class {classes[smallest]!r})" if classes is not None else ""
        raise DistmlError(
            f"{k} folds but the smallest class has only {int(counts[smallest])} {noun}{name}", option="--k"
        )


def fold_assignment(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The validation fold (0..k-1) of every image: exactly StratifiedKFold(k, shuffle=True, random_state=seed)'s.

    scikit-learn's algorithm in a few lines of numpy (scikit-learn's import alone is seconds of CPU, which a kfold
    run would spend while Ray starts on the same cores); tests check the two agree. Classes are numbered by first
    appearance; each class's share of every fold comes from dealing the sorted labels round-robin; within a class,
    the fold numbers are shuffled by one RandomState in class order.
    """
    check_k(labels, k)
    labels = np.asarray(labels)
    _, first_index, inverse = np.unique(labels, return_index=True, return_inverse=True)
    _, class_of_first = np.unique(first_index, return_inverse=True)
    encoded = class_of_first[inverse.reshape(-1)]
    classes = len(first_index)
    ordered = np.sort(encoded)
    allocation = np.asarray([np.bincount(ordered[i::k], minlength=classes) for i in range(k)])
    rng = np.random.RandomState(seed)
    assignment = np.empty(len(labels), dtype=np.int64)
    for c in range(classes):
        folds_for_class = np.arange(k).repeat(allocation[:, c])
        rng.shuffle(folds_for_class)
        assignment[encoded == c] = folds_for_class
    return assignment


def fold_indices(assignment: np.ndarray, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, validation indices) of one fold, both sorted."""
    is_val = assignment == fold
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def holdout_assignment(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """1 for the stratified validation holdout, 0 for training: a two-fold assignment whose fold 1 validates."""
    check_val_fraction(val_fraction)
    from sklearn.model_selection import StratifiedShuffleSplit  # a slow import, needed only for a holdout

    splitter = StratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    try:
        _, val_index = next(splitter.split(np.zeros(len(labels)), labels))
    except ValueError as exc:  # too few images for a class on one side
        raise DistmlError(
            f"cannot hold out {val_fraction} of {len(labels)} images: {exc}", option="--val-fraction"
        ) from None
    assignment = np.zeros(len(labels), dtype=np.int64)
    assignment[val_index] = 1
    return assignment


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of `size` images with the class proportions of `labels`, for quick runs."""
    if size >= len(labels):
        return np.arange(len(labels))
    classes = len(np.unique(labels))
    if size < 2 * classes:
        raise DistmlError(f"must be at least {2 * classes} (two examples per class), got {size}", option="--limit")
    from sklearn.model_selection import StratifiedShuffleSplit  # a slow import, needed only for a subset

    splitter = StratifiedShuffleSplit(n_splits=1, train_size=size, random_state=seed)
    subset, _ = next(splitter.split(np.zeros(len(labels)), labels))
    return np.sort(subset)


def fold_groups(folds: list[int], per_group: int) -> list[list[int]]:
    """Split the folds into groups of at most `per_group` (trained together as one stacked model), as evenly as
    possible."""
    count = -(-len(folds) // per_group)
    return [[int(f) for f in part] for part in np.array_split(np.array(folds), count)]
