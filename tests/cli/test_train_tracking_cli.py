"""`distml train --track mlflow|tensorboard`: a one-model run recorded as a parent run with one child, read back
with MlflowClient and TensorBoard's own reader (no Ray: `train` runs in the process)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_iris
from typer.testing import CliRunner

from distml.cli import app

runner = CliRunner()


@pytest.fixture()
def iris_csv(tmp_path):
    data = load_iris(as_frame=True)
    frame = data.frame.rename(columns={"target": "species"})
    path = tmp_path / "iris.csv"
    frame.to_csv(path, index=False)
    return path


def test_train_tracked_in_mlflow_logs_every_epoch_and_the_scores(iris_csv, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # MLflow keeps a SQLite store's artifacts in ./mlruns
    out = tmp_path / "run"
    args = ["train", "--data", f"csv:{iris_csv}", "--target", "species", "--epochs", "4", "--lr", "0.01"]
    result = runner.invoke(app, [*args, "--out", str(out), "--track", "mlflow", "-q"])
    assert result.exit_code == 0, result.output
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("distml").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    child = next(r for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert len(runs) == 2 and child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.params["epochs"] == "4" and parent.data.params["data"] == f"csv:{iris_csv}"
    history = pd.read_csv(out / "history.csv")
    curve = client.get_metric_history(child.info.run_id, "val_accuracy")
    assert [m.step for m in curve] == [1, 2, 3, 4]
    assert [m.value for m in curve] == pytest.approx(history["val_accuracy"].tolist())
    results = pd.read_json(out / "results.json", typ="series")
    assert parent.data.metrics["accuracy_mean"] == pytest.approx(results["accuracy"])
    assert "results.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_train_tracked_in_tensorboard_writes_its_curves(iris_csv, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = ["train", "--data", f"csv:{iris_csv}", "--target", "species", "--epochs", "3", "--lr", "0.01"]
    result = runner.invoke(app, [*args, "--out", str(out), "--track", "tensorboard", "-q"])
    assert result.exit_code == 0, result.output
    folders = list((out / "tensorboard").iterdir())
    assert len(folders) == 1
    events = EventAccumulator(str(folders[0]))
    events.Reload()
    history = pd.read_csv(out / "history.csv")
    values = [event.value for event in events.Scalars("loss/train")]
    assert np.allclose(values, history["train_loss"], atol=1e-6)
