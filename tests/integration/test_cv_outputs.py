"""What a cross-validation leaves besides its scores, on a real local Ray (the session's `local_ray`): out-of-fold
predictions, every fold model and their ensemble evaluated on a test set and exported, repeated folds equal to
scikit-learn's, the corrected interval, report.md, and `distml compare` deciding between real runs.

Data: scikit-learn's `load_digits` (1,797 real 8x8 images), its first 1,500 shuffled images to cross-validate and
the other 297 as the test set.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as scipy_stats
from sklearn.datasets import load_digits
from sklearn.metrics import f1_score
from sklearn.metrics import log_loss as sklearn_log_loss
from sklearn.model_selection import RepeatedStratifiedKFold
from typer.testing import CliRunner

import distml
from distml.cli import app
from distml.folds import assignment_hash

pytestmark = pytest.mark.integration

PROBABILITIES = [f"p_{c}" for c in range(10)]


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    order = np.random.RandomState(0).permutation(len(y))
    x, y = x[order].astype(np.float32), y[order]
    return (x[:1500], y[:1500]), (x[1500:], y[1500:])


@pytest.fixture(scope="module")
def repeated_run(local_ray, digits, tmp_path_factory):
    """k = 3, R = 2: six fold models, kept, scored on the test set."""
    (x, y), test = digits
    out = tmp_path_factory.mktemp("cv") / "repeated"
    result = distml.cross_validate(
        "mlp", (x, y), k=3, repeats=2, epochs=5, seed=0, test_data=test, keep_fold_models=True, out=out
    )
    return result, out


def test_repeated_folds_equal_scikit_learns_repeated_stratified_k_fold(repeated_run, digits):
    result, out = repeated_run
    (_, y), _ = digits
    assert result.fold_assignment.shape == (2, 1500) and len(result.folds) == 6 and result.complete
    splits = RepeatedStratifiedKFold(n_splits=3, n_repeats=2, random_state=0).split(np.zeros(len(y)), y)
    for number, (_, val_index) in enumerate(splits):
        repeat, fold = divmod(number, 3)
        np.testing.assert_array_equal(np.flatnonzero(result.fold_assignment[repeat] == fold), np.sort(val_index))
    table = pd.read_csv(out / "fold_assignment.csv")
    assert list(table.columns) == ["repeat", "index", "label", "fold", "group"] and len(table) == 3000
    saved_hash = json.loads((out / "config.json").read_text())["fold_assignment_hash"]
    assert saved_hash == assignment_hash(result.fold_assignment)


def test_out_of_fold_accuracy_equals_the_validation_size_weighted_mean_of_the_folds(repeated_run, digits):
    result, out = repeated_run
    (_, y), _ = digits
    oof = pd.read_csv(out / "oof.csv")
    pd.testing.assert_frame_equal(oof, result.oof, check_dtype=False, atol=1e-5)
    assert len(oof) == 3000 and list(oof.columns[:5]) == ["repeat", "fold", "index", "label", "predicted"]
    assert list(oof.columns[5:]) == PROBABILITIES
    for repeat in (0, 1):  # every example once per repeat, held out by the fold the assignment says
        rows = oof[oof["repeat"] == repeat]
        np.testing.assert_array_equal(rows["index"], np.arange(1500))
        np.testing.assert_array_equal(rows["fold"], result.fold_assignment[repeat])
    np.testing.assert_array_equal(oof["label"], np.tile(y, 2))
    folds = result.folds
    weighted = (folds["val_accuracy"] * folds["val_size"]).sum() / folds["val_size"].sum()
    assert (oof["label"] == oof["predicted"]).mean() == pytest.approx(weighted, abs=1e-12)
    assert weighted > 0.85  # chance is 0.10
    scores = result.oof_scores.set_index("metric")["value"]
    assert scores["accuracy"] == pytest.approx(weighted, abs=1e-12)
    assert scores["f1_macro"] == pytest.approx(f1_score(oof["label"], oof["predicted"], average="macro"), abs=1e-12)
    probabilities = oof[PROBABILITIES].to_numpy()
    assert scores["log_loss"] == pytest.approx(sklearn_log_loss(oof["label"], probabilities), abs=1e-5)
    confusion = pd.read_csv(out / "oof_confusion_matrix.csv", index_col=0).to_numpy()
    assert confusion.sum() == 3000 and np.trace(confusion) == (oof["label"] == oof["predicted"]).sum()
    assert (out / "oof_confusion_matrix.png").stat().st_size > 10_000


def test_every_fold_model_is_scored_on_the_test_set_and_their_ensemble_exports_like_any_model(repeated_run, digits):
    result, out = repeated_run
    _, (test_x, test_y) = digits
    predictions = pd.read_csv(out / "test_predictions.csv")
    assert len(predictions) == len(test_y) and (predictions["label"] == test_y).all()
    inputs = torch.from_numpy(test_x)
    member_probabilities = []
    for row in result.folds.itertuples():
        folder = out / "fold_models" / f"repeat_{row.repeat}_fold_{row.fold}"
        model = distml.load_model(folder)
        with torch.no_grad():
            probabilities = model(inputs).softmax(1).numpy()
        member_probabilities.append(probabilities)
        # the exported fold model is the one the trainer scored: same test predictions and accuracy
        np.testing.assert_array_equal(predictions[f"repeat_{row.repeat}_fold_{row.fold}"], probabilities.argmax(1))
        assert row.test_accuracy == pytest.approx((probabilities.argmax(1) == test_y).mean(), abs=1e-12)
    mean = np.mean(member_probabilities, axis=0)
    np.testing.assert_allclose(predictions[PROBABILITIES].to_numpy(), mean, atol=1e-5)
    program = torch.export.load(out / "ensemble" / "model.pt2").module()
    with torch.no_grad():
        exported = program(inputs).softmax(1).numpy()
    np.testing.assert_allclose(exported, mean, atol=1e-5)  # the program outputs log(mean p)
    via_predict = distml.predict(out / "ensemble", (test_x, test_y))
    np.testing.assert_array_equal(via_predict["predicted"], mean.argmax(1))
    ensemble = result.ensemble_scores.set_index("metric")["value"]
    assert ensemble["accuracy"] == pytest.approx((mean.argmax(1) == test_y).mean(), abs=1e-12)
    assert ensemble["mean_fold_accuracy"] == pytest.approx(result.folds["test_accuracy"].mean(), abs=1e-12)
    assert ensemble["models"] == 6
    per_class = pd.read_csv(out / "ensemble_per_class.csv")
    assert per_class["support"].sum() == len(test_y)


def test_the_summary_and_report_give_the_corrected_interval(repeated_run):
    result, out = repeated_run
    folds = result.folds
    row = result.summary.set_index("metric").loc["val_accuracy"]
    values = folds["val_accuracy"].to_numpy()
    j = len(values)
    ratio = folds["val_size"].mean() / folds["train_size"].mean()  # 500 / 1000
    half = scipy_stats.t.ppf(0.975, j - 1) * np.sqrt((1 / j + ratio) * values.var(ddof=1))
    assert row["corrected_ci95_low"] == pytest.approx(values.mean() - half, abs=1e-12)
    assert row["corrected_ci95_high"] == pytest.approx(values.mean() + half, abs=1e-12)
    assert row["corrected_ci95_high"] - row["corrected_ci95_low"] > row["ci95_high"] - row["ci95_low"]
    report = (out / "report.md").read_text()
    assert f"{row['corrected_ci95_low']:.4f}-{row['corrected_ci95_high']:.4f}" in report
    for section in ("## Folds", "## Out-of-fold predictions", "## Test set: the fold models and their ensemble"):
        assert section in report
    for figure in ("fold_accuracy.png", "learning_curves.png", "oof_confusion_matrix.png"):
        assert f"]({figure})" in report and (out / figure).stat().st_size > 10_000


def test_the_cli_runs_grouped_folds_from_a_csv_column_and_writes_parquet(local_ray, digits, tmp_path):
    (x, y), _ = digits
    frame = pd.DataFrame(x[:600], columns=[f"px{i}" for i in range(64)]).assign(digit=y[:600])
    frame["writer"] = [f"w{i % 40}" for i in range(600)]  # 40 writers of 15 images each
    frame.to_csv(tmp_path / "digits.csv", index=False)
    out = tmp_path / "grouped"
    args = ["kfold", "--data", f"csv:{tmp_path / 'digits.csv'}", "--target", "digit", "--groups", "writer"]
    result = CliRunner().invoke(app, [*args, "--k", "4", "--epochs", "3", "--oof-format", "parquet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "corrected for overlapping folds" in result.stdout
    assignment = pd.read_csv(out / "fold_assignment.csv")
    assert assignment.groupby("group")["fold"].nunique().max() == 1  # every writer in one fold
    from sklearn.model_selection import StratifiedGroupKFold

    splits = StratifiedGroupKFold(4, shuffle=True, random_state=0).split(np.zeros(600), y[:600], frame["writer"])
    for fold, (_, val_index) in enumerate(splits):
        np.testing.assert_array_equal(np.flatnonzero(assignment["fold"] == fold), np.sort(val_index))
    oof = pd.read_parquet(out / "oof.parquet")
    assert list(oof.columns[:6]) == ["repeat", "fold", "index", "row", "label", "predicted"]
    np.testing.assert_array_equal(oof["row"], np.arange(600))  # the CSV row of each example
    folds = pd.read_csv(out / "folds.csv")
    assert folds["val_size"].sum() == 600 and (folds["val_accuracy"] > 0.5).all()


def test_compare_pairs_real_runs_on_the_same_folds_and_refuses_to_pair_runs_on_different_folds(
    repeated_run, digits, tmp_path
):
    """B: the same folds (seed 0) trained for 1 epoch instead of 5; C: 5 epochs on other folds (seed 1)."""
    _, out_a = repeated_run
    (x, y), test = digits
    out_b, out_c = tmp_path / "one-epoch", tmp_path / "other-folds"
    distml.cross_validate("mlp", (x, y), k=3, repeats=2, epochs=1, seed=0, test_data=test, out=out_b)
    distml.cross_validate("mlp", (x, y), k=3, repeats=2, epochs=5, seed=1, test_data=test, out=out_c)
    runs = [str(out_a), str(out_b), str(out_c)]
    result = CliRunner().invoke(app, ["compare", *runs, "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    tests = pd.read_csv(tmp_path / "cmp" / "paired_tests.csv").set_index(["run_a", "run_b"])
    assert len(tests) == 3

    paired = tests.loc[(runs[0], runs[1])]
    folds_a = pd.read_csv(out_a / "folds.csv").set_index(["repeat", "fold"])["val_accuracy"]
    folds_b = pd.read_csv(out_b / "folds.csv").set_index(["repeat", "fold"])["val_accuracy"]
    differences = (folds_a - folds_b).to_numpy()
    assert paired["test"] == "corrected paired t" and paired["folds"] == 6
    assert paired["mean_difference"] == pytest.approx(differences.mean(), abs=1e-12)
    t = differences.mean() / np.sqrt((1 / 6 + 500 / 1000) * differences.var(ddof=1))  # 500 validate, 1000 train
    assert paired["t"] == pytest.approx(t, rel=1e-9) and paired["df"] == 5
    assert paired["p"] == pytest.approx(2 * scipy_stats.t.sf(abs(t), 5), rel=1e-6)
    assert paired["verdict"].startswith("A better") and paired["p_a_better"] > 0.95  # 5 epochs beat 1
    predictions_a = pd.read_csv(out_a / "test_predictions.csv")
    predictions_b = pd.read_csv(out_b / "test_predictions.csv")
    right_a = predictions_a["ensemble_predicted"] == predictions_a["label"]
    right_b = predictions_b["ensemble_predicted"] == predictions_b["label"]
    assert paired["mcnemar_only_a_right"] == (right_a & ~right_b).sum()
    assert paired["mcnemar_only_b_right"] == (right_b & ~right_a).sum()

    unpaired = tests.loc[(runs[0], runs[2])]
    assert unpaired["test"] == "Welch (different folds)" and np.isnan(unpaired["p_a_better"])
    folds_c = pd.read_csv(out_c / "folds.csv")["val_accuracy"]
    welch = scipy_stats.ttest_ind(folds_a, folds_c, equal_var=False)
    assert unpaired["p"] == pytest.approx(welch.pvalue, rel=1e-6)
    assert "paired test refused" in result.stdout and out_c.name in result.stdout
    assert (tmp_path / "cmp" / "paired_differences.png").stat().st_size > 10_000


def test_a_live_display_gets_progress_within_epochs_and_other_handlers_do_not(local_ray, digits):
    """Trainers report steps within an epoch (a few times a second) only when a handler of the `distml` logger
    draws them, as the live display does."""
    from distml.progress import BatchProgress, EpochEnded

    class Recorder(logging.Handler):
        def __init__(self, wants: bool):
            super().__init__()
            self.wants_batches = wants
            self.events = []

        def emit(self, record):
            if hasattr(record, "event"):
                self.events.append(record.event)

    (x, y), _ = digits
    x, y = np.tile(x, (20, 1)), np.tile(y, 20)  # 30,000 rows: 470 steps an epoch, a couple of seconds
    logger = logging.getLogger("distml")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        for wants in (True, False):
            recorder = Recorder(wants)
            logger.addHandler(recorder)
            try:
                distml.cross_validate("mlp", (x, y), k=2, epochs=2, batch_size=32)
            finally:
                logger.removeHandler(recorder)
            batches = [e for e in recorder.events if isinstance(e, BatchProgress)]
            assert len([e for e in recorder.events if isinstance(e, EpochEnded)]) == 4
            if not wants:
                assert batches == []
                continue
            assert {e.unit for e in batches} == {"fold 0", "fold 1"} and {e.batches for e in batches} == {469}
            for unit in ("fold 0", "fold 1"):  # steps go forward within each epoch
                first = [e.batch for e in batches if e.unit == unit and e.epoch == 1]
                assert first == sorted(first) and len(first) >= 2
    finally:
        logger.setLevel(level)


def test_a_run_tracked_in_mlflow_has_a_parent_and_a_child_per_fold_with_every_epoch(
    local_ray, digits, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # MLflow keeps a SQLite store's artifacts in ./mlruns
    (x, y), _ = digits
    out = tmp_path / "tracked"
    result = distml.cross_validate("mlp", (x, y), k=3, epochs=2, out=out, track="mlflow")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("distml")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert parent.info.run_name == "tracked" and parent.info.status == "FINISHED"
    assert parent.data.params["k"] == "3" and parent.data.params["fold_assignment_hash"]
    summary = result.summary.set_index("metric")
    assert parent.data.metrics["val_accuracy_mean"] == pytest.approx(summary.loc["val_accuracy", "mean"])
    assert parent.data.metrics["val_accuracy_corrected_ci95_low"] == pytest.approx(
        summary.loc["val_accuracy", "corrected_ci95_low"]
    )
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"folds.csv", "summary.csv", "report.md", "oof.csv"} <= artifacts
    history = result.history
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        fold = int(child.info.run_name.split()[-1])
        curve = client.get_metric_history(child.info.run_id, "val_accuracy")
        expected = history[history["fold"] == fold].sort_values("epoch")["val_accuracy"].tolist()
        assert [m.step for m in curve] == [1, 2]
        assert [m.value for m in curve] == pytest.approx(expected)
        assert child.data.tags["device"] == "cpu" and child.info.status == "FINISHED"


def test_the_cli_writes_tensorboard_events_per_fold(local_ray, digits, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (x, y), _ = digits
    np.savez(tmp_path / "digits.npz", x=x, y=y)
    out = tmp_path / "tb"
    args = ["kfold", "--data", f"npz:{tmp_path / 'digits.npz'}", "--k", "2", "--epochs", "3", "--track", "tensorboard"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    history = pd.read_csv(out / "history.csv")
    for fold in (0, 1):
        events = EventAccumulator(str(out / "tensorboard" / f"fold_{fold}"))
        events.Reload()
        values = [event.value for event in events.Scalars("accuracy/val")]
        assert [event.step for event in events.Scalars("accuracy/val")] == [1, 2, 3]
        expected = history[history["fold"] == fold]["val_accuracy"].tolist()
        assert values == pytest.approx(expected, abs=1e-6)
