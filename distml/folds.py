"""The only splitter: stratified, shuffled, seeded K folds (the same as scikit-learn's StratifiedKFold), repeated,
grouped or given in a file; a validation holdout; subsets for quick runs; the fold-assignment file; and SplitData,
what every trainer reads."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distml.atomic import write_atomic
from distml.config import check_val_fraction
from distml.errors import DistmlError


@dataclass(frozen=True)
class SplitData:
    """Inputs, labels and the validation fold of every example: what every trainer reads, put in Ray's object store
    once (trainers on the same node read the arrays zero-copy). A holdout is two folds, fold 1 validating."""

    inputs: np.ndarray  # float32: images (N, C, H, W), tabular (N, F), or (N, 512) backbone features
    labels: np.ndarray  # int64 (N,)
    # int64 (N,), the validation fold of each example; or (R, N), its fold in each of R repeats
    assignment: np.ndarray
    test_inputs: np.ndarray | None = None  # a test set kept out of every fold, that each fold model is scored on
    test_labels: np.ndarray | None = None

    @property
    def k(self) -> int:
        """Folds per repeat (every fold holds at least one example)."""
        return int(self.assignment.max()) + 1

    def split(self, index: int) -> tuple[int, int]:
        """(repeat, fold) of the `index`-th of the R x k splits, numbered repeat-major."""
        return divmod(index, self.k)

    def name(self, index: int) -> str:
        """How progress lines name a split: "fold 3", or "repeat 1 fold 3" when there are repeats."""
        repeat, fold = self.split(index)
        return (
            f"repeat {repeat} fold {fold}" if self.assignment.ndim == 2 and len(self.assignment) > 1 else f"fold {fold}"
        )

    def indices(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(training indices, validation indices) of the `index`-th split (the fold itself with one repeat), both
        sorted."""
        repeat, fold = self.split(index)
        return fold_indices(self.assignment.reshape(-1, len(self.labels))[repeat], fold)

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
    """The validation fold (0..k-1) of every image: exactly StratifiedKFold(k, shuffle=True, random_state=seed)'s,
    the one repeat of repeated_fold_assignment."""
    return repeated_fold_assignment(labels, k, 1, seed)[0]


def repeated_fold_assignment(labels: np.ndarray, k: int, repeats: int, seed: int) -> np.ndarray:
    """(repeats, N) int64: row r is the validation fold (0..k-1) of every example in repeat r, exactly
    RepeatedStratifiedKFold(n_splits=k, n_repeats=repeats, random_state=seed)'s (its f-th split of repeat r is fold f).

    scikit-learn's algorithm in a few lines of numpy (scikit-learn's import alone is seconds of CPU, which a kfold
    run would spend while Ray starts on the same cores); tests check the two agree. Classes are numbered by first
    appearance; each class's share of every fold comes from dealing the sorted labels round-robin; within a class,
    the fold numbers are shuffled in class order, repeat after repeat, all by one RandomState.
    """
    _check_repeats(repeats)
    check_k(labels, k)
    labels = np.asarray(labels)
    _, first_index, inverse = np.unique(labels, return_index=True, return_inverse=True)
    _, class_of_first = np.unique(first_index, return_inverse=True)
    encoded = class_of_first[inverse.reshape(-1)]
    classes = len(first_index)
    ordered = np.sort(encoded)
    allocation = np.asarray([np.bincount(ordered[i::k], minlength=classes) for i in range(k)])
    members = [np.flatnonzero(encoded == c) for c in range(classes)]
    rng = np.random.RandomState(seed)
    assignment = np.empty((repeats, len(labels)), dtype=np.int64)
    for row in assignment:
        for c in range(classes):
            folds_for_class = np.arange(k).repeat(allocation[:, c])
            rng.shuffle(folds_for_class)
            row[members[c]] = folds_for_class
    return assignment


def group_fold_assignment(
    labels: np.ndarray, groups: np.ndarray, k: int, repeats: int, seed: int, classes: tuple | None = None
) -> np.ndarray:
    """(repeats, N) int64 folds that keep each group (one hashable value per example: a patient, a site) within one
    fold: row 0 is exactly StratifiedGroupKFold(k, shuffle=True, random_state=seed)'s, and each further repeat draws
    on from the same RandomState, as RepeatedStratifiedKFold's repeats do."""
    _check_repeats(repeats)
    check_k(labels, k)
    groups = np.asarray(groups)
    if len(groups) != len(labels):
        raise DistmlError(f"{len(groups)} group labels for {len(labels)} examples", option="--groups")
    try:  # numbered in sorted order, as StratifiedGroupKFold numbers them, so its shuffle picks the same groups
        _, codes = np.unique(groups, return_inverse=True)
    except TypeError:  # hashable values without an order among them (mixed types): numbered by first appearance
        number: dict = {}
        codes = np.array([number.setdefault(group, len(number)) for group in groups.tolist()])
    distinct = int(codes.max()) + 1
    if distinct < k:
        raise DistmlError(f"{k} folds but only {distinct} distinct groups", option="--groups")
    from sklearn.model_selection import StratifiedGroupKFold  # a slow import, needed only with --groups

    rng = np.random.RandomState(seed)
    assignment = np.empty((repeats, len(labels)), dtype=np.int64)
    for row in assignment:
        splitter = StratifiedGroupKFold(k, shuffle=True, random_state=rng)
        for fold, (_, val_index) in enumerate(splitter.split(labels, labels, codes.reshape(-1))):
            row[val_index] = fold
        check_training_parts(row, np.asarray(labels), k, classes, "--groups")
    return assignment


def _check_repeats(repeats: int) -> None:
    if repeats < 1:
        raise DistmlError(f"must be at least 1, got {repeats}", option="--repeats")


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


def read_groups(path: Path, size: int) -> np.ndarray:
    """The group label (a string) of every example, from a file of one label per line in dataset order."""
    groups = _read_lines(path, "--groups")
    if len(groups) != size:
        raise DistmlError(
            f"{path} has {len(groups)} group labels but the dataset has {size} examples", option="--groups"
        )
    return np.array(groups, dtype=str)


def given_fold_assignment(
    source: Path | np.ndarray, labels: np.ndarray, k: int, classes: tuple | None = None
) -> np.ndarray:
    """(1, N) int64: the validation fold (0..k-1) of every example, from a file of one fold number per line in dataset
    order (or an array of them, from Python), checked so that every fold validates some example and trains on every
    class (named by `classes`)."""
    labels = np.asarray(labels)
    if isinstance(source, np.ndarray):
        path, lines = "the folds given", [str(value) for value in source.reshape(-1).tolist()]
    else:
        path, lines = source, _read_lines(source, "--folds")
    folds = np.empty(len(lines), dtype=np.int64)
    for number, line in enumerate(lines, start=1):
        try:
            folds[number - 1] = int(line)
        except ValueError:
            raise DistmlError(f"line {number} of {path} is not a fold number: {line!r}", option="--folds") from None
    if len(folds) != len(labels):
        raise DistmlError(f"{path} has {len(folds)} lines but the dataset has {len(labels)} examples", option="--folds")
    outside = np.flatnonzero((folds < 0) | (folds >= k))
    if len(outside):
        value = int(folds[outside[0]])
        hint = "folds are numbered from 0" if value < 0 else f"give --k {folds.max() + 1} for the file's folds"
        raise DistmlError(f"fold {value} on line {outside[0] + 1} is outside 0..{k - 1}: {hint}", option="--folds")
    sizes = np.bincount(folds, minlength=k)
    if not sizes.all():
        raise DistmlError(f"fold {int(np.argmin(sizes))} of --k {k} has no example in {path}", option="--folds")
    check_training_parts(folds, labels, k, classes, "--folds")
    return folds[np.newaxis]


def check_training_parts(folds: np.ndarray, labels: np.ndarray, k: int, classes: tuple | None, option: str) -> None:
    """Every fold's training part must hold every class: a model never shown a class cannot be scored on it."""
    # validating[f, c]: the examples of class c that fold f validates; when that is all of them, f trains without c
    class_count = int(labels.max()) + 1
    validating = np.bincount(folds * class_count + labels, minlength=k * class_count).reshape(k, class_count)
    totals = validating.sum(axis=0)
    untrained = np.argwhere((validating == totals) & (totals > 0))
    if len(untrained):
        fold, label = (int(x) for x in untrained[0])
        name = repr(classes[label]) if classes is not None else label
        raise DistmlError(f"fold {fold} validates every example of class {name}, so trains without it", option=option)


def _read_lines(path: Path, option: str) -> list[str]:
    """The stripped lines of a one-value-per-line file, without trailing blank lines."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except OSError as exc:
        raise DistmlError(f"cannot read {path}: {exc.strerror}", option=option) from None
    except UnicodeDecodeError:
        raise DistmlError(f"{path} is not UTF-8 text", option=option) from None
    while lines and not lines[-1]:
        lines.pop()
    return lines


def assignment_hash(assignment: np.ndarray) -> str:
    """16 hex digits that differ whenever the folds do: sha256 of an (R, N) assignment's shape and int64 values ((N,)
    counts as (1, N))."""
    table = np.ascontiguousarray(np.atleast_2d(assignment), dtype="<i8")
    return hashlib.sha256(np.array(table.shape, dtype="<i8").tobytes() + table.tobytes()).hexdigest()[:16]


ASSIGNMENT_HEADER = ("repeat", "index", "label", "fold", "group")


def write_assignment(path: Path, labels: np.ndarray, assignment: np.ndarray, groups: np.ndarray | None = None) -> None:
    """fold_assignment.csv, atomically: one row per repeat and example (repeat-major), the group empty without groups.
    The csv module rather than pandas, whose import the driver would pay before training starts."""
    folds = np.atleast_2d(assignment).tolist()
    size = len(labels)
    index = range(size)
    label_column = np.asarray(labels).tolist()
    group_column = [""] * size if groups is None else np.asarray(groups).tolist()

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(ASSIGNMENT_HEADER)
            for repeat, row in enumerate(folds):
                writer.writerows(zip([repeat] * size, index, label_column, row, group_column, strict=True))

    write_atomic(path, write)


def read_assignment(path: Path) -> np.ndarray:
    """(R, N) int64 folds from fold_assignment.csv, or (1, N) from its older form, headed index,label,fold."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        rows = list(reader)
    if header not in (list(ASSIGNMENT_HEADER), ["index", "label", "fold"]):
        raise DistmlError(f"{path} is not a fold assignment: its header is {','.join(header)!r}")
    column = {name: i for i, name in enumerate(header)}

    def values(name: str) -> np.ndarray:
        return np.array([int(row[column[name]]) for row in rows], dtype=np.int64)

    index, fold = values("index"), values("fold")
    repeat = values("repeat") if "repeat" in column else np.zeros_like(index)
    assignment = np.empty((repeat.max() + 1, index.max() + 1), dtype=np.int64)
    if len(rows) != assignment.size:  # else some folds would be left unset
        raise DistmlError(f"{path} has {len(rows)} rows, not one per repeat and example ({assignment.size})")
    assignment[repeat, index] = fold
    return assignment
