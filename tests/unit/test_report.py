import math

import pandas as pd
import pytest

from distml import report
from distml.atomic import write_csv, write_json


def test_summary_covers_every_metric():
    folds = report.fold_table(
        [
            {
                "fold": f,
                "val_accuracy": a,
                "val_loss": 0.1 * f,
                "precision_macro": a,
                "recall_macro": a,
                "f1_macro": a,
                "train_seconds": 1.0 + f,
            }
            for f, a in [(1, 0.8), (0, 0.9)]
        ]
    )
    assert folds["fold"].tolist() == [0, 1]
    summary = report.summary_table(folds).set_index("metric")
    assert summary.loc["val_accuracy", "mean"] == pytest.approx(0.85)
    assert summary.loc["train_seconds", "std"] == pytest.approx(math.sqrt(0.5))
    assert summary["folds"].eq(2).all()


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    write_csv(tmp_path / "a.csv", pd.DataFrame({"x": [1, 2]}))
    write_json(tmp_path / "b.json", {"y": 1})
    write_json(tmp_path / "b.json", {"y": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.json"]
    assert pd.read_csv(tmp_path / "a.csv")["x"].tolist() == [1, 2]
    assert '"y": 2' in (tmp_path / "b.json").read_text()


def test_a_failed_write_keeps_the_old_file(tmp_path):
    from distml.atomic import write_atomic

    target = tmp_path / "keep.txt"
    target.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
