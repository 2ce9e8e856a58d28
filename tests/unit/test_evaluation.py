"""Holdout splits, per-class tables and confusion matrices on tiny, hand-checked inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distml.errors import DistmlError
from distml.folds import holdout_assignment, stratified_subset
from distml.report import markdown_table, per_class_table
from distml.train import confusion_matrix, evaluate


def test_holdout_is_stratified_and_seeded():
    labels = np.repeat(np.arange(10), 50)
    assignment = holdout_assignment(labels, 0.1, seed=3)
    assert assignment.sum() == 50
    assert np.bincount(labels[assignment == 1], minlength=10).tolist() == [5] * 10
    assert np.array_equal(assignment, holdout_assignment(labels, 0.1, seed=3))
    assert not np.array_equal(assignment, holdout_assignment(labels, 0.1, seed=4))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5])
def test_holdout_rejects_fractions_outside_zero_one(fraction):
    with pytest.raises(DistmlError, match="--val-fraction"):
        holdout_assignment(np.repeat(np.arange(10), 5), fraction, seed=0)


def test_stratified_subset_keeps_class_shares():
    labels = np.repeat(np.arange(10), [100, 100, 100, 100, 100, 100, 100, 100, 100, 300])
    subset = stratified_subset(labels, 120, seed=0)
    assert len(subset) == 120 and np.all(np.diff(subset) > 0)
    assert np.bincount(labels[subset]).tolist() == [10] * 9 + [30]
    assert len(stratified_subset(labels, 10_000, seed=0)) == len(labels)
    with pytest.raises(DistmlError, match="--limit"):
        stratified_subset(labels, 5, seed=0)


def test_confusion_totals_and_per_class_scores():
    targets = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predictions = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 2])
    confusion = confusion_matrix(targets, predictions, 3)
    assert confusion.sum() == 9
    assert confusion.sum(axis=1).tolist() == [3, 2, 4]  # true-class totals
    assert confusion.sum(axis=0).tolist() == [3, 3, 3]  # predicted-class totals
    table = per_class_table(confusion)
    assert table["support"].tolist() == [3, 2, 4]
    assert table["precision"].tolist() == pytest.approx([2 / 3, 2 / 3, 1.0])
    assert table["recall"].tolist() == pytest.approx([2 / 3, 1.0, 3 / 4])
    assert table.loc[2, "f1"] == pytest.approx(2 * 1.0 * 0.75 / 1.75)


def test_evaluate_confusion_counts_every_test_image():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 10))
    x, y = torch.randn(37, 1, 2, 2), torch.randint(0, 10, (37,))
    metrics = evaluate(model, x, y)
    assert metrics.confusion.sum() == 37
    assert metrics.accuracy == pytest.approx(np.trace(metrics.confusion) / 37)
    assert per_class_table(metrics.confusion)["support"].sum() == 37


def test_markdown_table_formats_floats_and_blanks_nan():
    table = per_class_table(np.array([[1, 0], [0, 0]]))
    text = markdown_table(table)
    assert text.splitlines()[0] == "| class | precision | recall | f1 | support | predicted |"
    assert "| 0 | 1.0000 | 1.0000 | 1.0000 | 1 | 1 |" in text
    assert text.count("\n") == 3
