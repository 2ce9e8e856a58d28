import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold

from distml.data import load_folder
from distml.errors import DistmlError
from distml.folds import check_k, fold_assignment, fold_indices


@pytest.mark.parametrize("k, seed", [(2, 0), (3, 7), (5, 42), (10, 1)])
def test_folds_equal_scikit_learns_stratified_kfold(sample_dir, k, seed):
    labels = load_folder(sample_dir, "sample").train_labels
    assignment = fold_assignment(labels, k, seed)
    splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)
    for fold, (train_index, val_index) in enumerate(splits):
        ours_train, ours_val = fold_indices(assignment, fold)
        np.testing.assert_array_equal(ours_val, np.sort(val_index))
        np.testing.assert_array_equal(ours_train, np.sort(train_index))


@pytest.mark.parametrize("k, seed", [(2, 3), (5, 0), (7, 11)])
def test_folds_equal_scikit_learns_for_uneven_classes_in_any_order(k, seed):
    """Class sizes that do not divide by k, and classes first seen out of label order (3, then 9, then 0...)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(10), rng.integers(k, 60, size=10)))
    expected = np.empty(len(labels), dtype=np.int64)
    for fold, (_, val_index) in enumerate(StratifiedKFold(k, shuffle=True, random_state=seed).split(labels, labels)):
        expected[val_index] = fold
    np.testing.assert_array_equal(fold_assignment(labels, k, seed), expected)


def test_folds_are_stratified_and_cover_every_image_once(sample_dir):
    labels = load_folder(sample_dir, "sample").train_labels
    assignment = fold_assignment(labels, 5, 0)
    assert sorted(np.unique(assignment).tolist()) == [0, 1, 2, 3, 4]
    overall = np.bincount(labels) / len(labels)
    for fold in range(5):
        share = np.bincount(labels[assignment == fold], minlength=10) / (assignment == fold).sum()
        assert np.abs(share - overall).max() < 0.01


def test_seed_changes_the_split_and_the_same_seed_repeats_it():
    labels = np.repeat(np.arange(10), 30)
    assert np.array_equal(fold_assignment(labels, 3, 1), fold_assignment(labels, 3, 1))
    assert not np.array_equal(fold_assignment(labels, 3, 1), fold_assignment(labels, 3, 2))


def test_k_must_be_at_least_two_and_at_most_the_smallest_class():
    labels = np.array([0] * 10 + [1] * 4)
    with pytest.raises(DistmlError, match="--k: must be at least 2"):
        check_k(labels, 1)
    with pytest.raises(DistmlError, match="smallest class has only 4"):
        check_k(labels, 5)
    check_k(labels, 4)
