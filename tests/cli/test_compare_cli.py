"""distml compare through Typer's CliRunner on K-fold run folders written here: the files and the printed decision, the
refusal line for runs on different folds, and each bad input as one line, exit status 2 and nothing written."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from distml.cli import app
from distml.folds import assignment_hash, repeated_fold_assignment, write_assignment

runner = CliRunner()
EXAMPLES, K = 500, 5
LABELS = np.arange(EXAMPLES) % 10


def write_kfold_run(path, val_accuracy, *, seed=0, digest="5f1c0e2a9b3d7e44", source="mnist"):
    """A finished 5-fold run folder, one repeat: config.json, folds.csv, fold_assignment.csv."""
    path.mkdir(parents=True)
    assignment = repeated_fold_assignment(LABELS, K, 1, seed)
    write_assignment(path / "fold_assignment.csv", LABELS, assignment)
    config = {
        "command": "kfold",
        "options": {"k": K, "repeats": 1, "model": "mlp"},
        "dataset": {"source": source, "examples": EXAMPLES, "digest": digest},
        "fold_assignment_hash": assignment_hash(assignment),
    }
    (path / "config.json").write_text(json.dumps(config))
    scores = np.asarray(val_accuracy)
    pd.DataFrame(
        {
            "repeat": 0,
            "fold": range(K),
            "train_size": 400,
            "val_size": 100,
            "val_accuracy": scores,
            "val_loss": 1 - scores,
            "precision_macro": scores,
            "recall_macro": scores,
            "f1_macro": scores,
            "test_accuracy": np.nan,
            "test_loss": np.nan,
            "epochs": 2,
            "train_seconds": 3.0,
        }
    ).to_csv(path / "folds.csv", index=False)
    return path


@pytest.fixture
def runs(tmp_path):
    return (
        write_kfold_run(tmp_path / "kfold-mlp", [0.97, 0.96, 0.98, 0.97, 0.96]),
        write_kfold_run(tmp_path / "kfold-cnn", [0.99, 0.98, 0.99, 0.99, 0.98]),
        write_kfold_run(tmp_path / "kfold-seed-1", [0.95, 0.96, 0.94, 0.95, 0.96], seed=1),
    )


def _one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_compare_decides_and_writes_the_tables_and_the_plot(runs, tmp_path):
    mlp, cnn, other = runs
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(mlp), str(cnn), str(other), "--rope", "0.002", "--out", str(out)])
    assert result.exit_code == 0, result.output
    tests = pd.read_csv(out / "paired_tests.csv")
    assert tests["test"].tolist() == ["corrected paired t", "Welch (different folds)", "Welch (different folds)"]
    assert tests["rope"].eq(0.002).all() and tests["metric"].eq("val_accuracy").all()
    assert tests.loc[0, "mean_difference"] == pytest.approx(-0.018)  # 0.968 against 0.986: B better
    assert tests.loc[0, "verdict"].startswith("B better")
    assert len(pd.read_csv(out / "comparison.csv")) == 3
    assert (out / "paired_differences.png").stat().st_size > 5000
    hashes = [json.loads((run / "config.json").read_text())["fold_assignment_hash"] for run in runs]
    refusal = (
        f"paired test refused: {mlp} and {other} used different fold assignments (hash {hashes[0]} vs {hashes[2]}); "
        "Welch's unpaired test instead"
    )
    assert refusal in result.stdout.splitlines()
    assert "paired test refused: " + str(cnn) in result.stdout
    assert "equivalent within ±0.002" in result.stdout  # the decision table's header
    assert "accuracy_ci95: K-fold's corrected interval" in result.stdout
    assert result.stdout.strip().splitlines()[-1].endswith(f"3 pair(s) tested: {out / 'paired_tests.csv'}")


def test_quiet_prints_only_the_result_line(runs, tmp_path):
    mlp, cnn, _ = runs
    result = runner.invoke(
        app, ["compare", str(mlp), str(cnn), "--metric", "val_loss", "-q", "--out", str(tmp_path / "c")]
    )
    assert result.exit_code == 0, result.output
    assert len(result.stdout.strip().splitlines()) == 1
    tests = pd.read_csv(tmp_path / "c" / "paired_tests.csv")
    assert tests.loc[0, "metric"] == "val_loss" and tests.loc[0, "mean_difference"] == pytest.approx(-0.018)


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--rope", "-0.01"], ["--rope: must be a finite number of at least 0, got -0.01"]),
        (
            ["--metric", "accuracy"],
            ["--metric: unknown metric 'accuracy'", "val_accuracy, val_loss, precision_macro, "],
        ),
    ],
)
def test_bad_options_are_one_line_errors_and_write_nothing(runs, tmp_path, extra, fragments):
    mlp, cnn, _ = runs
    result = runner.invoke(app, ["compare", str(mlp), str(cnn), *extra, "--out", str(tmp_path / "cmp")])
    _one_line_error(result, *fragments)
    assert not (tmp_path / "cmp").exists()


def test_bad_run_folders_are_one_line_errors_naming_them_and_write_nothing(runs, tmp_path):
    mlp, cnn, _ = runs
    empty = tmp_path / "empty"
    empty.mkdir()
    unfinished = tmp_path / "kfold-unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((mlp / "config.json").read_text())
    fashion = write_kfold_run(tmp_path / "kfold-fashion", [0.9] * 5, digest="0badc0ffee000000", source="fashion")
    out = tmp_path / "cmp"
    cases = [
        ([mlp, empty], [f"{empty} holds no distml run"]),
        ([mlp, unfinished], [f"{unfinished}: the K-fold run has no folds.csv yet (unfinished?)"]),
        ([mlp, cnn, fashion], [str(mlp), str(fashion), "5f1c0e2a9b3d7e44 of mnist vs 0badc0ffee000000 of fashion"]),
    ]
    for folders, fragments in cases:
        _one_line_error(runner.invoke(app, ["compare", *map(str, folders), "--out", str(out)]), *fragments)
        assert not out.exists()


@pytest.mark.parametrize(
    ("config", "text"),
    [
        ('{"command": "sweep"}', "is a sweep run; compare takes the folders of kfold, train, finetune runs"),
        ('{"command": "pipeline"}', "(a pipeline's are inside it)"),
        ('{"command": "kfold", ', "cannot be read (JSONDecodeError)"),
        ("[1, 2]", "is not a run distml knows"),
    ],
)
def test_compare_refuses_sweep_pipeline_and_corrupt_folders_by_name(tmp_path, config, text):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text(config)
    result = runner.invoke(app, ["compare", str(folder), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0] and str(folder) in lines[0], result.stderr
    assert not (tmp_path / "cmp").exists()
