"""Bad repeats, groups and folds for `distml kfold`: one line naming the option, exit status 2, nothing written and
no Ray started (each is checked before Ray starts). The same errors reach Python as DistmlError."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import distml

runner = CliRunner()


@pytest.fixture()
def csv_data(tmp_path):
    """60 rows of four numbers, three classes of 20."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(60, 4)).astype(np.float32), columns=["a", "b", "c", "d"])
    frame["label"] = np.repeat(["x", "y", "z"], 20)
    path = tmp_path / "data.csv"
    frame.to_csv(path, index=False)
    return path


def test_repeats_below_one_is_refused(refused, csv_data, tmp_path):
    refused(
        ["kfold", "--epochs", "1", "--data", f"csv:{csv_data}", "--target", "label", "--repeats", "0"],
        tmp_path / "r",
        "--repeats",
        "got 0",
    )


def test_an_unknown_oof_format_is_refused(refused, csv_data, tmp_path):
    args = ["--data", f"csv:{csv_data}", "--target", "label", "--oof-format", "xlsx"]
    refused(["kfold", "--epochs", "1", *args], tmp_path / "r", "--oof-format", "'xlsx'")


def test_a_groups_file_of_the_wrong_length_is_refused(refused, csv_data, tmp_path):
    groups = tmp_path / "groups.txt"
    groups.write_text("\n".join(["g"] * 59) + "\n")
    args = ["--data", f"csv:{csv_data}", "--target", "label", "--groups", str(groups)]
    refused(["kfold", "--epochs", "1", *args], tmp_path / "r", "--groups", "59")


def test_fewer_groups_than_folds_are_refused(refused, csv_data, tmp_path):
    groups = tmp_path / "groups.txt"
    groups.write_text("\n".join(["g1", "g2"] * 30) + "\n")
    args = ["--data", f"csv:{csv_data}", "--target", "label", "--groups", str(groups), "--k", "3"]
    refused(["kfold", "--epochs", "1", *args], tmp_path / "r", "--groups", "only 2 distinct groups")


def test_groups_that_leave_a_class_out_of_a_training_part_are_refused(refused, csv_data, tmp_path):
    """Class x lives in one site only: the fold that validates that site trains without x. The site is a column of
    the CSV (and so no feature)."""
    frame = pd.read_csv(csv_data)
    frame["site"] = ["s0"] * 20 + ["s1", "s2"] * 10 + ["s3", "s4"] * 10
    frame.to_csv(tmp_path / "sites.csv", index=False)
    args = ["--data", f"csv:{tmp_path / 'sites.csv'}", "--target", "label", "--groups", "site", "--k", "3"]
    refused(["kfold", "--epochs", "1", *args], tmp_path / "r", "--groups", "class 'x'")


def test_a_groups_name_that_is_neither_file_nor_column_is_refused(refused, csv_data, tmp_path):
    args = ["--data", f"csv:{csv_data}", "--target", "label", "--groups", "nowhere"]
    refused(["kfold", "--epochs", "1", *args], tmp_path / "r", "--groups", "no column 'nowhere'")


@pytest.mark.parametrize(
    ("values", "text"),
    [
        (["0", "1"] * 30, "fold 2 of --k 3 has no example"),  # an empty fold
        (["0", "1", "2"] * 19 + ["0", "1", "7"], "fold 7 on line 60 is outside 0..2"),
        (["0", "1", "2"] * 19 + ["0", "1", "two"], "line 60"),
        (["0", "1", "2"] * 19 + ["0", "1"], "59 lines"),
        # class x's 20 rows all in fold 0: fold 0 trains without it
        (["0"] * 20 + ["1", "2"] * 20, "class 'x'"),
    ],
)
def test_a_bad_folds_file_is_refused(refused, csv_data, tmp_path, values, text):
    folds = tmp_path / "folds.txt"
    folds.write_text("\n".join(values) + "\n")
    args = ["--data", f"csv:{csv_data}", "--target", "label", "--folds", str(folds), "--k", "3"]
    refused(["kfold", "--epochs", "1", *args], tmp_path / "r", "--folds", text)


def test_a_folds_file_with_repeats_is_refused(refused, csv_data, tmp_path):
    folds = tmp_path / "folds.txt"
    folds.write_text("\n".join(["0", "1", "2"] * 20) + "\n")
    args = ["--data", f"csv:{csv_data}", "--target", "label", "--folds", str(folds), "--k", "3", "--repeats", "2"]
    refused(["kfold", "--epochs", "1", *args], tmp_path / "r", "--folds", "drop --repeats")


def test_the_api_raises_the_same_for_bad_groups(tmp_path):
    x = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    y = np.repeat([0, 1, 2], 10)
    with pytest.raises(distml.DistmlError, match="only 2 distinct groups"):
        distml.cross_validate("mlp", (x, y), k=3, groups=["a", "b"] * 15, out=tmp_path / "r")
    with pytest.raises(ValueError, match="has no example"):
        distml.cross_validate("mlp", (x, y), k=3, folds=[0, 1] * 15, out=tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "args, text",
    [
        (["--limit", "0"], "must be at least 1, got 0"),
        (["--limit", "5"], "must be at least 6 (two examples per class), got 5"),
        (["--limit", "12", "--k", "5"], "5 folds but the smallest class has only 4 examples (class 'x') in a subset"),
        (["--limit", "30", "--groups", "label"], "cannot keep a --folds or --groups assignment"),
    ],
)
def test_a_limit_too_small_for_the_folds_or_with_an_assignment_is_refused(refused, csv_data, tmp_path, args, text):
    refused(
        ["kfold", "--epochs", "1", "--data", f"csv:{csv_data}", "--target", "label", *args],
        tmp_path / "r",
        "--limit",
        text,
    )


def test_limit_cross_validates_train_limits_stratified_subset(csv_data):
    from distml.config import KFoldConfig
    from distml.folds import stratified_subset
    from distml.kfold import _load, check_data
    from distml.recipe import Given

    config = KFoldConfig(data=f"csv:{csv_data}", target="label", k=3, limit=30, seed=4, batch_size=8)
    full = _load(KFoldConfig(data=f"csv:{csv_data}", target="label", k=3), Given()).dataset
    limited = _load(config, Given()).dataset
    assert np.bincount(limited.labels).tolist() == [10, 10, 10]
    assert np.array_equal(limited.inputs, full.inputs[stratified_subset(full.labels, 30, 4)])  # the same draw
    check_data(config)  # the folds and the batch size fit the subset
    with pytest.raises(distml.DistmlError, match="--batch-size: 32 is more than the smallest fold's 20"):
        check_data(KFoldConfig(data=f"csv:{csv_data}", target="label", k=3, limit=30, batch_size=32))
