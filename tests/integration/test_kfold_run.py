"""`distml kfold` for real: a local Ray with 2 CPUs, one epoch, on the real MNIST sample.

One run (k = 4, two trials of two stacked folds each) is checked from several sides; DDP folds run on their own.
"""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import StratifiedKFold
from typer.testing import CliRunner

from distml.cli import app
from distml.data import load_folder

pytestmark = pytest.mark.integration


def one_epoch_kfold(sample_dir, out, *options: str):
    """`distml kfold` for one epoch on the shipped sample, in this process's local Ray; returns the CLI's result."""
    result = CliRunner().invoke(
        app, ["kfold", "--epochs", "1", "--data-dir", str(sample_dir), "--out", str(out), *options]
    )
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def kfold_run(local_ray, sample_dir, tmp_path_factory):
    """k = 4, 2 workers, --folds-per-trial auto: two trials, each training two MLP folds at once as one stack."""
    out = tmp_path_factory.mktemp("runs") / "kfold"
    result = one_epoch_kfold(sample_dir, out, "--k", "4", "--workers", "2", "--seed", "7", "--folds-per-trial", "auto")
    return out, result


def test_report_has_a_row_per_fold_with_accuracy_well_above_chance(kfold_run):
    out, _ = kfold_run
    folds = pd.read_csv(out / "folds.csv")
    assert folds["fold"].tolist() == [0, 1, 2, 3]
    assert folds["train_size"].tolist() == [4500] * 4
    assert folds["val_size"].sum() == 6000
    assert (folds["val_accuracy"] > 0.75).all()  # chance is 0.10
    assert folds["f1_macro"].between(0.7, 1.0).all()
    assert (folds["epochs"] == 1).all() and (folds["attempts"] == 1).all()
    assert (folds["train_seconds"] > 0).all() and (folds["device"] == "cpu").all()


def test_summary_history_and_plots(kfold_run):
    out, result = kfold_run
    folds = pd.read_csv(out / "folds.csv")
    summary = pd.read_csv(out / "summary.csv").set_index("metric")
    assert summary.loc["val_accuracy", "mean"] == pytest.approx(folds["val_accuracy"].mean())
    assert summary.loc["val_accuracy", "std"] == pytest.approx(folds["val_accuracy"].std(ddof=1))
    assert summary.loc["val_accuracy", "ci95_low"] < summary.loc["val_accuracy", "mean"]
    history = pd.read_csv(out / "history.csv")
    assert len(history) == 4 and set(history.columns) >= {"train_loss", "val_loss", "train_accuracy", "val_accuracy"}
    np.testing.assert_allclose(history["val_accuracy"], folds["val_accuracy"])  # one epoch: the last is the final
    for png in ("fold_accuracy.png", "learning_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "val_accuracy" in result.output and "4/4 folds" in result.output
    assert "6,000 training images" in result.output


def test_fold_assignment_is_kept_and_equals_scikit_learns(kfold_run, sample_dir):
    out, _ = kfold_run
    assignment = pd.read_csv(out / "fold_assignment.csv")
    labels = load_folder(sample_dir, "sample").train_labels
    np.testing.assert_array_equal(assignment["label"], labels)
    splits = StratifiedKFold(4, shuffle=True, random_state=7).split(np.zeros(len(labels)), labels)
    for fold, (_, val_index) in enumerate(splits):
        np.testing.assert_array_equal(np.flatnonzero(assignment["fold"] == fold), np.sort(val_index))


def test_config_records_options_versions_and_dataset(kfold_run):
    out, _ = kfold_run
    config = json.loads((out / "config.json").read_text())
    assert config["options"]["k"] == 4 and config["options"]["seed"] == 7
    assert config["options"]["cluster"]["workers"] == 2
    assert config["dataset"]["train_images"] == 6000 and config["dataset"]["source"] == "data-dir"
    assert {"torch", "ray", "distml", "python"} <= set(config["versions"])


def test_resuming_a_finished_run_changes_nothing(kfold_run):
    out, _ = kfold_run
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    result = CliRunner().invoke(app, ["kfold", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert "all 4 folds already finished; nothing to do" in result.output
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert before == after


def test_a_second_run_into_the_same_folder_is_refused(kfold_run, sample_dir):
    out, _ = kfold_run
    result = CliRunner().invoke(app, ["kfold", "--data-dir", str(sample_dir), "--out", str(out)])
    assert result.exit_code == 2
    assert "already holds a run" in result.stderr


def test_stacked_folds_two_per_trial(kfold_run):
    """--folds-per-trial auto with 2 workers: 4 folds in 2 trials, each training 2 MLPs at once."""
    out, _ = kfold_run
    folds = pd.read_csv(out / "folds.csv")
    assert json.loads((out / "config.json").read_text())["options"]["folds_per_trial"] is None  # auto
    # folds trained together share their trainer's seconds: two trainers, two folds each
    assert folds["train_seconds"].value_counts().tolist() == [2, 2]
    # each pair checkpointed its epochs in one file, which a retried or resumed pair carries on from
    saved = sorted(path.parent.name for path in (out / "ray" / "folds").glob("*/state.pt"))
    assert saved == ["folds-0-1", "folds-2-3"]


def test_workers_per_fold_trains_each_fold_with_ddp(local_ray, sample_dir, tmp_path):
    """--workers-per-fold 2: each fold's trial drives a Ray Train TorchTrainer of two DDP workers (gloo)."""
    out = tmp_path / "ddp"
    one_epoch_kfold(sample_dir, out, "--k", "2", "--workers", "1", "--workers-per-fold", "2")
    folds = pd.read_csv(out / "folds.csv")
    assert folds["fold"].tolist() == [0, 1]
    for fold in (0, 1):  # two ranks trained each fold: their ids and world size, as the DDP workers recorded them
        trained = json.loads((out / "folds" / f"fold_{fold}.json").read_text())
        assert trained["ranks"] == [0, 1] and trained["world_size"] == 2, trained
    assert (folds["val_accuracy"] > 0.75).all()
    # the DDP folds' predictions come back through Tune like the fold trainers' do
    oof = pd.read_csv(out / "oof.csv")
    assert len(oof) == folds["val_size"].sum()
    weighted = (folds["val_accuracy"] * folds["val_size"]).sum() / folds["val_size"].sum()
    assert (oof["label"] == oof["predicted"]).mean() == pytest.approx(weighted, abs=1e-12)
    # each fold's TorchTrainer checkpointed its epoch into the run's storage
    checkpoints = list((out / "ray" / "train").rglob("state.pt"))
    assert {part for path in checkpoints for part in path.parts if part.startswith("fold-")} == {"fold-0", "fold-1"}
