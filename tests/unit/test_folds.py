import numpy as np
import pytest
from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedGroupKFold, StratifiedKFold

from distml.data import load_folder
from distml.errors import DistmlError
from distml.folds import (
    assignment_hash,
    check_k,
    fold_assignment,
    fold_indices,
    given_fold_assignment,
    group_fold_assignment,
    read_assignment,
    read_groups,
    repeated_fold_assignment,
    write_assignment,
)


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


def _uneven_labels(seed: int) -> np.ndarray:
    """Ten classes of 12..59 examples, shuffled so that classes are first seen out of label order."""
    rng = np.random.default_rng(seed)
    return rng.permutation(np.repeat(np.arange(10), rng.integers(12, 60, size=10)))


def _as_assignment(splits, k: int, size: int) -> np.ndarray:
    """scikit-learn's splits as an (R, N) assignment: split i is fold i % k of repeat i // k."""
    splits = list(splits)
    assignment = np.full((len(splits) // k, size), -1)
    for i, (train_index, val_index) in enumerate(splits):
        assignment[i // k, val_index] = i % k
        assert len(train_index) + len(val_index) == size
    return assignment


LABEL_SETS = {
    "uneven": _uneven_labels(4),
    "skewed binary, class 1 first": np.concatenate([[1], np.random.default_rng(0).permutation([1] * 12 + [0] * 41)]),
}


@pytest.mark.parametrize("label_set", LABEL_SETS)
@pytest.mark.parametrize("k, repeats, seed", [(2, 3, 0), (3, 1, 5), (5, 4, 42), (10, 2, 7)])
def test_repeated_folds_equal_scikit_learns_repeated_stratified_kfold(label_set, k, repeats, seed):
    labels = LABEL_SETS[label_set]
    splitter = RepeatedStratifiedKFold(n_splits=k, n_repeats=repeats, random_state=seed)
    expected = _as_assignment(splitter.split(labels, labels), k, len(labels))
    ours = repeated_fold_assignment(labels, k, repeats, seed)
    assert ours.shape == (repeats, len(labels)) and ours.dtype == np.int64
    np.testing.assert_array_equal(ours, expected)


def test_repeated_folds_on_the_mnist_sample_equal_scikit_learns(sample_dir):
    labels = load_folder(sample_dir, "sample").train_labels
    splitter = RepeatedStratifiedKFold(n_splits=5, n_repeats=3, random_state=11)
    np.testing.assert_array_equal(
        repeated_fold_assignment(labels, 5, 3, 11), _as_assignment(splitter.split(labels, labels), 5, len(labels))
    )


@pytest.mark.parametrize("k, seed", [(2, 0), (5, 3), (7, 99)])
def test_one_repeat_is_fold_assignment_and_further_repeats_reshuffle(k, seed):
    labels = _uneven_labels(seed)
    repeated = repeated_fold_assignment(labels, k, 3, seed)
    np.testing.assert_array_equal(repeated[0], fold_assignment(labels, k, seed))
    np.testing.assert_array_equal(repeated_fold_assignment(labels, k, 1, seed), repeated[:1])
    assert (repeated[1] != repeated[0]).mean() > 0.3  # a new split, not a copy of the first
    for row in repeated:  # each repeat keeps the classes' shares: at most one example apart between folds
        per_fold = np.array([np.bincount(labels[row == fold], minlength=10) for fold in range(k)])
        assert (per_fold.max(axis=0) - per_fold.min(axis=0)).max() <= 1


def test_repeats_must_be_at_least_one():
    labels = np.repeat(np.arange(3), 10)
    with pytest.raises(DistmlError, match="^--repeats: must be at least 1, got 0$"):
        repeated_fold_assignment(labels, 3, 0, 0)
    with pytest.raises(DistmlError, match="^--repeats: must be at least 1, got -1$"):
        group_fold_assignment(labels, np.arange(30) % 6, 3, -1, 0)


def _patients(labels: np.ndarray, seed: int) -> np.ndarray:
    """String group labels, 2..9 examples each, in no sorted order."""
    rng = np.random.default_rng(seed)
    return np.array([f"patient-{int(p)}" for p in rng.integers(0, len(labels) // 5, size=len(labels))])


@pytest.mark.parametrize("k, seed", [(2, 0), (3, 8), (5, 21)])
def test_group_folds_equal_scikit_learns_stratified_group_kfold(k, seed):
    labels = _uneven_labels(seed)
    groups = _patients(labels, seed)
    ours = group_fold_assignment(labels, groups, k, 3, seed)
    first = StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(labels, labels, groups)
    np.testing.assert_array_equal(ours[0], _as_assignment(first, k, len(labels))[0])
    rng = np.random.RandomState(seed)  # the repeats: one RandomState drawn on, as RepeatedStratifiedKFold does
    repeats = [StratifiedGroupKFold(k, shuffle=True, random_state=rng).split(labels, labels, groups) for _ in "abc"]
    expected = np.vstack([_as_assignment(splits, k, len(labels)) for splits in repeats])
    np.testing.assert_array_equal(ours, expected)
    assert (ours[1] != ours[0]).any()


@pytest.mark.parametrize(
    "groups",
    [
        np.array(["b", "a", "c", "d", "e", "f"] * 10),
        np.array([3, "x", 2.5, ("a", 1), None, "y"] * 10, dtype=object),  # hashable but not orderable
    ],
    ids=["strings", "mixed types"],
)
def test_every_group_lies_in_one_fold_of_each_repeat(groups):
    labels = np.arange(60) % 2
    assignment = group_fold_assignment(labels, groups, 3, 4, 1)
    assert assignment.shape == (4, 60)
    for row in assignment:
        assert sorted(np.unique(row).tolist()) == [0, 1, 2]
        for group in groups[:6]:
            folds = {int(f) for f, g in zip(row, groups, strict=True) if g == group}
            assert len(folds) == 1, (group, folds)


def test_groups_must_match_the_examples_and_be_at_least_k():
    labels = np.arange(12) % 2
    with pytest.raises(DistmlError, match="^--groups: 11 group labels for 12 examples$"):
        group_fold_assignment(labels, np.arange(11), 3, 1, 0)
    with pytest.raises(DistmlError, match="^--groups: 4 folds but only 3 distinct groups$"):
        group_fold_assignment(labels, np.arange(12) % 3, 4, 1, 0)


def test_read_groups_strips_lines_and_tolerates_a_blank_last_line(tmp_path):
    path = tmp_path / "groups.txt"
    path.write_text("site A\n site B \nsite A\n\n")
    np.testing.assert_array_equal(read_groups(path, 3), ["site A", "site B", "site A"])


def test_read_groups_names_both_counts_and_a_missing_file(tmp_path):
    path = tmp_path / "groups.txt"
    path.write_text("a\nb\nc\n")
    with pytest.raises(
        DistmlError, match=r"^--groups: .*groups.txt has 3 group labels but the dataset has 4 examples$"
    ):
        read_groups(path, 4)
    with pytest.raises(DistmlError, match=r"^--groups: cannot read .*absent.txt: No such file or directory$"):
        read_groups(tmp_path / "absent.txt", 3)


def test_given_folds_round_trip(tmp_path):
    labels = _uneven_labels(2)
    folds = fold_assignment(labels, 4, 2)
    path = tmp_path / "folds.txt"
    path.write_text("\n".join(str(f) for f in folds) + "\n\n")
    given = given_fold_assignment(path, labels, 4)
    assert given.shape == (1, len(labels)) and given.dtype == np.int64
    np.testing.assert_array_equal(given[0], folds)


GIVEN_LABELS = np.array([0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize(
    "text, message",
    [
        ("0\n1\n2\nx\n0\n1\n", r"line 4 of .*folds.txt is not a fold number: 'x'"),
        ("0\n1\n2\n1.5\n0\n1\n", r"line 4 of .*folds.txt is not a fold number: '1.5'"),
        ("0\n1\n2\n0\n1\n", r".*folds.txt has 5 lines but the dataset has 6 examples"),
        ("0\n1\n2\n0\n1\n2\n0\n", r".*folds.txt has 7 lines but the dataset has 6 examples"),
        ("0\n1\n2\n4\n1\n2\n", r"fold 4 on line 4 is outside 0..2: give --k 5 for the file's folds"),
        ("0\n-1\n2\n0\n1\n2\n", r"fold -1 on line 2 is outside 0..2: folds are numbered from 0"),
        ("0\n1\n0\n1\n0\n1\n", r"fold 2 of --k 3 has no example in .*folds.txt"),
        ("0\n1\n2\n0\n1\n1\n", r"fold 1 validates every example of class 'two', so trains without it"),
    ],
    ids=[
        "not an integer",
        "a fraction",
        "too few lines",
        "too many lines",
        "past k",
        "negative",
        "empty fold",
        "class missing from training",
    ],
)
def test_given_folds_reject_each_bad_file_in_one_line(tmp_path, text, message):
    path = tmp_path / "folds.txt"
    path.write_text(text)
    with pytest.raises(DistmlError, match=f"^--folds: {message}$") as caught:
        given_fold_assignment(path, GIVEN_LABELS, 3, classes=("zero", "one", "two"))
    assert "\n" not in str(caught.value)


def test_given_folds_name_the_class_by_number_without_class_names(tmp_path):
    path = tmp_path / "folds.txt"
    path.write_text("2\n2\n0\n1\n0\n1\n")
    with pytest.raises(DistmlError, match="^--folds: fold 2 validates every example of class 0, so trains without it$"):
        given_fold_assignment(path, GIVEN_LABELS, 3)
    with pytest.raises(DistmlError, match="^--folds: cannot read .*absent.txt: No such file or directory$"):
        given_fold_assignment(tmp_path / "absent.txt", GIVEN_LABELS, 3)


def test_assignment_hash_follows_the_folds_and_nothing_else():
    assignment = np.array([[0, 1, 2], [2, 1, 0]])
    digest = assignment_hash(assignment)
    assert digest == "2b010d408e44f368"  # pinned: a saved run's digest must still match after an upgrade
    assert assignment_hash(assignment.astype(np.int32)) == digest
    assert assignment_hash(np.asfortranarray(assignment)) == digest
    assert assignment_hash(assignment[:1]) == assignment_hash(assignment[0])  # (N,) is one repeat
    changed = assignment.copy()
    changed[1, 2] = 1
    assert assignment_hash(changed) != digest
    assert assignment_hash(assignment.reshape(3, 2)) != digest  # same values, other shape
    assert assignment_hash(assignment[:, :2]) != assignment_hash(assignment.reshape(-1)[:4])


@pytest.mark.parametrize("repeats", [1, 3])
@pytest.mark.parametrize("with_groups", [False, True])
def test_assignment_file_round_trips(tmp_path, repeats, with_groups):
    labels = _uneven_labels(5)
    assignment = repeated_fold_assignment(labels, 3, repeats, 5)
    groups = np.array([f"site {i % 7}, ward {i % 3}" for i in range(len(labels))]) if with_groups else None
    path = tmp_path / "run" / "fold_assignment.csv"
    write_assignment(path, labels, assignment, groups)
    lines = path.read_text().splitlines()
    assert lines[0] == "repeat,index,label,fold,group"
    assert len(lines) == 1 + repeats * len(labels)
    group = '"site 0, ward 0"' if with_groups else ""  # a comma inside a group is quoted
    assert lines[1] == f"0,0,{labels[0]},{assignment[0, 0]},{group}"
    last = len(labels) - 1
    assert lines[-1].startswith(f"{repeats - 1},{last},{labels[last]},{assignment[-1, last]},")
    np.testing.assert_array_equal(read_assignment(path), assignment)
    assert [p.name for p in path.parent.iterdir()] == ["fold_assignment.csv"]  # no temporary file left


def test_a_one_dimensional_assignment_is_written_as_one_repeat(tmp_path):
    labels = np.array([0, 1, 0, 1])
    write_assignment(tmp_path / "a.csv", labels, np.array([1, 0, 0, 1]))
    np.testing.assert_array_equal(read_assignment(tmp_path / "a.csv"), [[1, 0, 0, 1]])


def test_read_assignment_reads_the_older_index_label_fold_file(tmp_path):
    labels = _uneven_labels(6)
    folds = fold_assignment(labels, 5, 6)
    path = tmp_path / "fold_assignment.csv"
    table = np.column_stack([np.arange(len(labels)), labels, folds])  # as earlier runs wrote it
    np.savetxt(path, table, fmt="%d", delimiter=",", header="index,label,fold", comments="")
    assignment = read_assignment(path)
    assert assignment.shape == (1, len(labels))
    np.testing.assert_array_equal(assignment[0], folds)


def test_read_assignment_rejects_other_files_and_missing_rows(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("fold,accuracy\n0,0.9\n")
    with pytest.raises(DistmlError, match="is not a fold assignment: its header is 'fold,accuracy'$"):
        read_assignment(path)
    path.write_text("repeat,index,label,fold,group\n0,0,1,0,\n0,1,0,1,\n1,0,1,1,\n")
    with pytest.raises(DistmlError, match="has 3 rows, not one per repeat and example \\(4\\)$"):
        read_assignment(path)
