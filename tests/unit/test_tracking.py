"""Experiment tracking from the progress events, no Ray: synthetic events logged inside `tracked(...)` and read back
from a real MLflow store (SQLite in tmp_path) with MlflowClient, and from TensorBoard's event files with its own
reader."""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from distml.errors import DistmlError
from distml.progress import EpochEnded, RunEnded, RunStarted, UnitEnded, UnitRetried, publish
from distml.tracking import MLFLOW_FILE, flat_params, tracked

EPOCHS = 3
OPTIONS = {
    "model": "mlp",
    "k": 3,
    "epochs": EPOCHS,
    "lr": 0.01,
    "cluster": {"workers": 2, "cpus_per_worker": 1.5, "address": None},
    "model_kwargs": {},
    "notes": "n" * 7000,  # longer than an MLflow param may be
}
DATASET = {"source": "sample", "examples": 600, "location": "/data/mnist"}
ASSIGNMENT_HASH = "5e3c1b0a9d"
SUMMARY = [
    {
        "metric": "val_accuracy",
        "mean": np.float64(0.9125),
        "std": 0.0125,
        "ci95_low": 0.881,
        "ci95_high": 0.944,
        "corrected_ci95_low": 0.862,
        "corrected_ci95_high": 0.963,
        "folds": np.int64(3),
    },
    {
        "metric": "train_seconds",
        "mean": 4.5,
        "std": 0.5,
        "ci95_low": 3.25,
        "ci95_high": 5.75,
        "corrected_ci95_low": math.nan,  # seconds get no corrected interval
        "corrected_ci95_high": math.nan,
        "folds": 3,
    },
]
REPORT_FILES = ("folds.csv", "summary.csv", "report.md")
log = logging.getLogger("distml.kfold")  # as the workflows log: a child of `distml`


# ---- synthetic runs ----


def epoch_record(index: int, epoch: int) -> dict:
    return {
        "train_loss": 1.0 / (epoch + index + 1),
        "train_accuracy": 0.5 + 0.1 * epoch + 0.01 * index,
        "val_loss": 1.5 / (epoch + index + 1),
        "val_accuracy": 0.45 + 0.1 * epoch + 0.01 * index,
        "seconds": 0.25 * epoch + index,
    }


def fold_result(index: int, attempts: int = 1) -> dict:
    last = epoch_record(index, EPOCHS)
    return {
        "split": index,
        "repeat": 0,
        "fold": index,
        "train_size": 400,
        "val_size": 200,
        "val_accuracy": last["val_accuracy"],
        "val_loss": last["val_loss"],
        "precision_macro": 0.7 + 0.01 * index,
        "recall_macro": 0.71,
        "f1_macro": 0.705,
        "epochs": EPOCHS,
        "train_seconds": 4.0 + index,
        "node": "10.0.0.7",
        "node_id": "abc123",
        "hostname": "worker-7",
        "device": "cpu",
        "history_json": "[]",
        "confusion_json": "[[1]]",
        "test_accuracy": None,
        "test_loss": None,
        "attempts": attempts,
    }


def make_run_folder(tmp_path, name: str = "kfold-20250101-120000"):
    run_dir = tmp_path / name
    run_dir.mkdir()
    header = {"command": "kfold", "options": OPTIONS, "dataset": DATASET, "fold_assignment_hash": ASSIGNMENT_HASH}
    (run_dir / "config.json").write_text(json.dumps(header))
    for file in REPORT_FILES:
        (run_dir / file).write_text(f"the {file} of this run\n")
    return run_dir


def start(run_dir, units: list[str], resumed: bool = False) -> None:
    event = RunStarted("kfold", str(run_dir), units, 3, EPOCHS, OPTIONS, DATASET, resumed)
    publish(log, "running", event)


def train(index: int, epochs, unit: str | None = None) -> None:
    for epoch in epochs:
        publish(log, "epoch", EpochEnded(unit or f"fold {index}", index, epoch, EPOCHS, epoch_record(index, epoch)))


def finish(index: int, attempts: int = 1, unit: str | None = None) -> None:
    publish(log, "finished", UnitEnded(unit or f"fold {index}", index, fold_result(index, attempts)))


def end(run_dir, status: str = "finished") -> None:
    files = [str(run_dir / f) for f in (*REPORT_FILES, MLFLOW_FILE)]
    publish(log, status, RunEnded("kfold", str(run_dir), status, SUMMARY, files))


def whole_run(run_dir, units=("fold 0", "fold 1", "fold 2")) -> None:
    start(run_dir, list(units))
    for index, unit in enumerate(units):
        train(index, range(1, EPOCHS + 1), unit)
        finish(index, unit=unit)
    end(run_dir)


# ---- fixtures ----


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """An MLflow SQLite store with its tables made once (seconds of migrations), copied for each test."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(empty_store, tmp_path, monkeypatch) -> MlflowClient:
    """A fresh MLflow store named by MLFLOW_TRACKING_URI; artifacts go under tmp_path (MLflow puts them in ./)."""
    path = tmp_path / "mlflow.db"
    shutil.copy(empty_store, path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path}")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_TRUNCATE_LONG_VALUES", "false")  # distml keeps to MLflow's limits itself
    return MlflowClient(f"sqlite:///{path}")


@pytest.fixture
def warnings():
    """The warnings the `distml` logger gets (its own handler: a CLI test may have turned propagation off)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("distml")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def runs_of(client: MlflowClient, experiment: str = "distml"):
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    return parents, children


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ---- MLflow ----


def test_mlflow_records_a_parent_run_and_one_child_per_fold(store, tmp_path, warnings):
    run_dir = make_run_folder(tmp_path)
    with tracked("mlflow"):
        whole_run(run_dir)

    assert warnings == []
    parents, children = runs_of(store)
    assert len(parents) == 1 and sorted(children) == ["fold 0", "fold 1", "fold 2"]
    parent = parents[0]
    assert parent.info.run_name == run_dir.name and parent.info.status == "FINISHED"
    assert parent.data.tags["distml.command"] == "kfold" and parent.data.tags["distml.run_dir"] == str(run_dir)
    params = parent.data.params
    assert params["cluster.workers"] == "2" and params["cluster.cpus_per_worker"] == "1.5"
    assert params["cluster.address"] == "None" and params["model_kwargs"] == "{}"
    assert params["k"] == "3" and params["lr"] == "0.01" and params["model"] == "mlp"
    assert params["notes"] == "n" * 6000  # cut to MLflow's limit
    assert params["dataset.examples"] == "600" and params["dataset.location"] == "/data/mnist"
    assert params["fold_assignment_hash"] == ASSIGNMENT_HASH
    metrics = parent.data.metrics
    assert metrics["val_accuracy_mean"] == 0.9125 and metrics["val_accuracy_std"] == 0.0125
    assert metrics["val_accuracy_ci95_low"] == 0.881 and metrics["val_accuracy_ci95_high"] == 0.944
    assert metrics["val_accuracy_corrected_ci95_low"] == 0.862
    assert metrics["val_accuracy_corrected_ci95_high"] == 0.963
    assert metrics["train_seconds_mean"] == 4.5 and "train_seconds_corrected_ci95_low" not in metrics
    artifacts = sorted(a.path for a in store.list_artifacts(parent.info.run_id))
    assert artifacts == sorted(REPORT_FILES)  # the tracker's own mlflow.json is no report file

    for index in range(3):
        child = children[f"fold {index}"]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        steps = range(1, EPOCHS + 1)
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert history(store, child.info.run_id, key) == [(e, epoch_record(index, e)[key]) for e in steps]
        assert history(store, child.info.run_id, "epoch_seconds") == [(e, 0.25 * e + index) for e in steps]
        final = child.data.metrics
        assert final["precision_macro"] == 0.7 + 0.01 * index and final["train_seconds"] == 4.0 + index
        assert final["attempts"] == 1 and "test_accuracy" not in final
        assert child.data.tags["node"] == "10.0.0.7" and child.data.tags["hostname"] == "worker-7"
        assert child.data.tags["device"] == "cpu" and "history_json" not in child.data.tags
        assert child.data.params["train_size"] == "400" and child.data.params["fold"] == str(index)

    saved = json.loads((run_dir / MLFLOW_FILE).read_text())
    assert saved["parent_run_id"] == parent.info.run_id and saved["tracking_uri"] == store.tracking_uri
    assert saved["children"] == {str(i): children[f"fold {i}"].info.run_id for i in range(3)}


def test_a_resumed_run_continues_its_parent_and_its_unfinished_folds_runs(store, tmp_path):
    run_dir = make_run_folder(tmp_path)
    with pytest.raises(KeyboardInterrupt), tracked("mlflow"):
        start(run_dir, ["fold 0", "fold 1", "fold 2"])
        train(0, range(1, EPOCHS + 1))
        finish(0)
        train(1, range(1, 3))  # fold 1 is interrupted after epoch 2; fold 2 never started
        raise KeyboardInterrupt

    parents, children = runs_of(store)
    assert [p.info.status for p in parents] == ["KILLED"]
    assert {name: run.info.status for name, run in children.items()} == {"fold 0": "FINISHED", "fold 1": "KILLED"}

    with tracked("mlflow"):  # --resume: only folds 1 and 2 run
        start(run_dir, ["fold 1", "fold 2"], resumed=True)
        train(1, [3])
        finish(1)
        train(2, range(1, EPOCHS + 1))
        finish(2)
        end(run_dir)

    resumed_parents, resumed_children = runs_of(store)
    assert [p.info.run_id for p in resumed_parents] == [parents[0].info.run_id]  # the same parent, no new one
    assert resumed_parents[0].info.status == "FINISHED"
    assert resumed_parents[0].data.params["cluster.workers"] == "2"
    assert resumed_parents[0].data.metrics["val_accuracy_mean"] == 0.9125
    assert sorted(resumed_children) == ["fold 0", "fold 1", "fold 2"]
    fold_1 = resumed_children["fold 1"]
    assert fold_1.info.run_id == children["fold 1"].info.run_id and fold_1.info.status == "FINISHED"
    assert history(store, fold_1.info.run_id, "train_loss") == [
        (e, epoch_record(1, e)["train_loss"]) for e in (1, 2, 3)
    ]
    assert resumed_children["fold 0"].info.run_id == children["fold 0"].info.run_id


def test_a_retried_fold_continues_its_own_run_and_counts_its_failures(store, tmp_path):
    run_dir = make_run_folder(tmp_path)
    with tracked("mlflow"):
        start(run_dir, ["fold 0", "fold 1"])
        train(0, [1])
        train(1, [1])
        publish(log, "retrying", UnitRetried(["fold 0", "fold 1"], [0, 1], 1, "ActorDiedError: the node was lost"))
        train(0, [2, 3])  # the retry goes on from its checkpoint
        train(1, [2, 3])
        finish(0, attempts=2)
        finish(1, attempts=2)
        end(run_dir)

    parents, children = runs_of(store)
    assert len(parents) == 1 and sorted(children) == ["fold 0", "fold 1"]
    for index in range(2):
        child = children[f"fold {index}"]
        assert child.info.status == "FINISHED"
        assert history(store, child.info.run_id, "failures") == [(1, 1.0)]  # after epoch 1
        assert child.data.tags["last_error"] == "ActorDiedError: the node was lost"
        assert child.data.metrics["attempts"] == 2
        assert [s for s, _ in history(store, child.info.run_id, "val_accuracy")] == [1, 2, 3]


def test_a_diverged_fold_ends_its_child_run_as_failed_and_the_others_finish(store, tmp_path):
    run_dir = make_run_folder(tmp_path)
    with tracked("mlflow"):
        start(run_dir, ["fold 0", "fold 1"])
        train(0, [1, 2, 3])
        train(1, [1])
        diverged = {"split": 1, "fold": 1, "diverged": True, "error": "fold 1: diverged at epoch 2", "epochs": 1}
        publish(log, diverged["error"], UnitEnded("fold 1", 1, diverged))
        finish(0)
        end(run_dir, "failed")

    parents, children = runs_of(store)
    assert parents[0].info.status == "FAILED"
    assert children["fold 0"].info.status == "FINISHED" and children["fold 1"].info.status == "FAILED"
    assert [s for s, _ in history(store, children["fold 1"].info.run_id, "val_accuracy")] == [1]


def test_trials_are_child_runs_too(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "my sweep")
    run_dir = make_run_folder(tmp_path, "sweep-1")
    with tracked("mlflow"):
        whole_run(run_dir, units=("trial 0", "trial 1"))

    parents, children = runs_of(store, "my sweep")
    assert len(parents) == 1 and sorted(children) == ["trial 0", "trial 1"]
    assert history(store, children["trial 1"].info.run_id, "val_accuracy") == [
        (e, epoch_record(1, e)["val_accuracy"]) for e in (1, 2, 3)
    ]


def test_a_missing_tracker_package_is_one_error_before_the_block_runs(monkeypatch):
    ran = []
    logger = logging.getLogger("distml")
    handlers = list(logger.handlers)
    for kind in ("mlflow", "tensorboard"):
        monkeypatch.setitem(sys.modules, kind, None)  # what an environment without the package gives
        with pytest.raises(DistmlError) as error, tracked(kind):
            ran.append(kind)
        assert error.value.option == "--track"
        assert f"pip install 'distml[{kind}]'" in error.value.message
    assert ran == [] and logger.handlers == handlers


def test_an_unknown_tracker_is_refused():
    with pytest.raises(DistmlError, match="unknown tracker 'numpy'"), tracked("numpy"):
        pass


def test_an_unreachable_tracking_server_is_one_warning_and_the_run_goes_on(tmp_path, monkeypatch, warnings):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    run_dir = make_run_folder(tmp_path)
    logger = logging.getLogger("distml")
    level, handlers = logger.level, list(logger.handlers)
    started = time.perf_counter()
    with tracked("mlflow"):
        whole_run(run_dir)
        done = True
    assert done and time.perf_counter() - started < 20
    assert len(warnings) == 1
    assert warnings[0].name == "distml.tracking" and "mlflow tracking stopped" in warnings[0].getMessage()
    assert not (run_dir / MLFLOW_FILE).exists()
    assert logger.level == level and logger.handlers == handlers


def test_the_logger_is_restored_after_the_block_even_on_an_error(store, tmp_path):
    logger = logging.getLogger("distml")
    logger.setLevel(logging.WARNING)
    try:
        handlers = list(logger.handlers)
        with pytest.raises(RuntimeError), tracked("mlflow"):
            assert logger.level == logging.INFO and len(logger.handlers) == len(handlers) + 1
            raise RuntimeError("a fold crashed")
        assert logger.level == logging.WARNING and logger.handlers == handlers
    finally:
        logger.setLevel(logging.NOTSET)


def test_a_run_that_raises_ends_its_open_runs_as_failed(store, tmp_path):
    run_dir = make_run_folder(tmp_path)
    with pytest.raises(DistmlError), tracked("mlflow"):
        start(run_dir, ["fold 0"])
        train(0, [1])
        raise DistmlError("no fold finished; nothing to report")
    parents, children = runs_of(store)
    assert [p.info.status for p in parents] == ["FAILED"] and children["fold 0"].info.status == "FAILED"


def test_nested_options_flatten_to_dotted_params():
    options = {"k": 5, "cluster": {"workers": 2, "gpu": {"count": 0}}, "kwargs": {}, "sizes": [64, 32], "x": None}
    assert flat_params(options) == {
        "k": "5",
        "cluster.workers": "2",
        "cluster.gpu.count": "0",
        "kwargs": "{}",
        "sizes": "[64, 32]",
        "x": "None",
    }


# ---- TensorBoard ----


def test_tensorboard_writes_event_files_per_fold(tmp_path, warnings):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = make_run_folder(tmp_path)
    with tracked("tensorboard"):
        start(run_dir, ["fold 0", "fold 1"])
        for index in range(2):
            train(index, range(1, EPOCHS + 1))
            finish(index)
        end(run_dir)

    assert warnings == []
    assert sorted(p.name for p in (run_dir / "tensorboard").iterdir()) == ["fold_0", "fold_1"]
    for index in range(2):
        folder = run_dir / "tensorboard" / f"fold_{index}"
        assert len(list(folder.glob("events.out.tfevents.*"))) == 1  # one writer for the whole fold
        events = EventAccumulator(str(folder))
        events.Reload()
        assert sorted(events.Tags()["scalars"]) == ["accuracy/train", "accuracy/val", "loss/train", "loss/val"]
        for tag, key in (
            ("loss/train", "train_loss"),
            ("loss/val", "val_loss"),
            ("accuracy/train", "train_accuracy"),
            ("accuracy/val", "val_accuracy"),
        ):
            scalars = [(s.step, s.value) for s in events.Scalars(tag)]
            # event files hold 32-bit floats
            assert scalars == [(e, float(np.float32(epoch_record(index, e)[key]))) for e in range(1, EPOCHS + 1)]


# ---- tune: each trial a K-fold run, its folds grandchild runs ----

TUNE_K, TUNE_EPOCHS = 3, 2
TUNE_TRIALS = (1, 2)  # Tune's trial numbers; trial 2 diverges at its end


def tune_row(trial: int, fold: int, epoch: int) -> dict:
    return {
        "fold": fold,
        "epoch": epoch,
        "train_loss": 1.0 / (epoch + fold + trial),
        "train_accuracy": 0.5 + 0.1 * epoch + 0.01 * fold + 0.001 * trial,
        "val_loss": 1.5 / (epoch + fold + trial),
        "val_accuracy": 0.4 + 0.1 * epoch + 0.01 * fold + 0.001 * trial,
        "seconds": 0.5 * epoch + fold,
    }


def tune_epoch(trial: int, epoch: int) -> None:
    """A trial's epoch as cv_tune publishes it: the cross-fold means, and every fold's row in folds_json."""
    rows = [tune_row(trial, fold, epoch) for fold in range(TUNE_K)]
    record = {key: float(np.mean([row[key] for row in rows])) for key in rows[0] if key not in ("fold", "epoch")}
    record["folds_json"] = json.dumps(rows)
    publish(log, "epoch", EpochEnded(f"trial {trial}", trial, epoch, TUNE_EPOCHS, record))


def tune_start(run_dir, resumed: bool = False) -> None:
    units = [f"trial {trial}" for trial in TUNE_TRIALS]
    event = RunStarted("tune", str(run_dir), units, len(units), TUNE_EPOCHS, OPTIONS, DATASET, resumed)
    publish(log, "running", event)


def tune_finish(trial: int, diverged: bool = False) -> None:
    params = {"lr": 0.01 * trial, "batch_size": 32}
    if diverged:
        result = {**params, "diverged": True}
    else:
        last = [tune_row(trial, fold, TUNE_EPOCHS) for fold in range(TUNE_K)]
        mean = float(np.mean([row["val_accuracy"] for row in last]))
        result = {**params, "epoch": TUNE_EPOCHS, "val_accuracy": mean, "stopped_early": False}
    publish(log, "trial ended", UnitEnded(f"trial {trial}", trial, result))


def tune_end(run_dir, status: str = "finished") -> None:
    files = [str(run_dir / f) for f in (*REPORT_FILES, MLFLOW_FILE)]
    publish(log, status, RunEnded("tune", str(run_dir), status, SUMMARY, files))


def fold_history(trial: int, fold: int, key: str, epochs=range(1, TUNE_EPOCHS + 1)) -> list[tuple[int, float]]:
    return [(e, tune_row(trial, fold, e)[key]) for e in epochs]


def all_keys(runs) -> set[str]:
    return {key for run in runs for key in run.data.metrics} | {key for run in runs for key in run.data.params}


def test_tune_records_a_child_per_trial_and_a_grandchild_per_fold(store, tmp_path, warnings):
    run_dir = make_run_folder(tmp_path, "tune-1")
    with tracked("mlflow"):
        tune_start(run_dir)
        for trial in TUNE_TRIALS:
            for epoch in range(1, TUNE_EPOCHS + 1):
                tune_epoch(trial, epoch)
            tune_finish(trial, diverged=trial == 2)
        tune_end(run_dir)

    assert warnings == []
    parents, children = runs_of(store)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent_id = parents[0].info.run_id
    folds = [f"trial {t} fold {f}" for t in TUNE_TRIALS for f in range(TUNE_K)]
    assert sorted(children) == sorted([f"trial {t}" for t in TUNE_TRIALS] + folds)
    assert "folds_json" not in all_keys([*parents, *children.values()])
    saved = json.loads((run_dir / MLFLOW_FILE).read_text())
    for trial in TUNE_TRIALS:
        child = children[f"trial {trial}"]
        assert child.data.tags["mlflow.parentRunId"] == parent_id
        assert child.info.status == ("FAILED" if trial == 2 else "FINISHED")
        means = [(e, float(np.mean([tune_row(trial, f, e)["val_accuracy"] for f in range(TUNE_K)]))) for e in (1, 2)]
        assert history(store, child.info.run_id, "val_accuracy") == means  # the cross-fold means, as sent
        assert saved["children"][str(trial)] == child.info.run_id
        for fold in range(TUNE_K):
            grandchild = children[f"trial {trial} fold {fold}"]
            assert grandchild.data.tags["mlflow.parentRunId"] == child.info.run_id
            assert grandchild.data.tags["distml.unit"] == f"trial {trial} fold {fold}"
            assert grandchild.info.status == child.info.status
            for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
                assert history(store, grandchild.info.run_id, key) == fold_history(trial, fold, key)
            assert history(store, grandchild.info.run_id, "epoch_seconds") == [(e, 0.5 * e + fold) for e in (1, 2)]
            assert "fold" not in grandchild.data.metrics and "epoch" not in grandchild.data.metrics
            assert saved["children"][f"{trial}/{fold}"] == grandchild.info.run_id


def test_a_resumed_tune_run_continues_its_trials_and_their_fold_runs(store, tmp_path):
    run_dir = make_run_folder(tmp_path, "tune-2")
    with pytest.raises(KeyboardInterrupt), tracked("mlflow"):
        tune_start(run_dir)
        tune_epoch(1, 1)  # trial 1 is interrupted after epoch 1; trial 2 never started
        raise KeyboardInterrupt

    parents, children = runs_of(store)
    assert [p.info.status for p in parents] == ["KILLED"]
    assert sorted(children) == ["trial 1", "trial 1 fold 0", "trial 1 fold 1", "trial 1 fold 2"]
    assert {run.info.status for run in children.values()} == {"KILLED"}

    with tracked("mlflow"):  # --resume: trial 1 goes on from its checkpoint, trial 2 runs
        tune_start(run_dir, resumed=True)
        tune_epoch(1, 2)
        tune_finish(1)
        for epoch in range(1, TUNE_EPOCHS + 1):
            tune_epoch(2, epoch)
        tune_finish(2, diverged=True)
        tune_end(run_dir, "failed")

    resumed_parents, resumed = runs_of(store)
    assert [p.info.run_id for p in resumed_parents] == [parents[0].info.run_id]  # no new parent
    assert resumed_parents[0].info.status == "FAILED"
    assert len(store.search_runs([parents[0].info.experiment_id])) == 1 + 2 + 2 * TUNE_K  # nothing made twice
    for name, run in children.items():  # trial 1 and its folds: the same runs, continued and finished
        assert resumed[name].info.run_id == run.info.run_id and resumed[name].info.status == "FINISHED"
    for fold in range(TUNE_K):
        grandchild = resumed[f"trial 1 fold {fold}"]
        assert grandchild.data.tags["mlflow.parentRunId"] == children["trial 1"].info.run_id
        assert history(store, grandchild.info.run_id, "val_accuracy") == fold_history(1, fold, "val_accuracy")
        diverged = resumed[f"trial 2 fold {fold}"]
        assert diverged.data.tags["mlflow.parentRunId"] == resumed["trial 2"].info.run_id
        assert diverged.info.status == "FAILED"
        assert history(store, diverged.info.run_id, "val_accuracy") == fold_history(2, fold, "val_accuracy")
    assert resumed["trial 2"].info.status == "FAILED"
    assert "folds_json" not in all_keys([*resumed_parents, *resumed.values()])


def test_a_tune_run_that_raises_ends_its_fold_runs_before_their_trial_and_it_before_the_parent(
    store, tmp_path, monkeypatch
):
    run_dir = make_run_folder(tmp_path, "tune-3")
    ended = []
    set_terminated = MlflowClient.set_terminated

    def recording(client, run_id, *args, **kwargs):
        ended.append(run_id)
        return set_terminated(client, run_id, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_terminated", recording)
    for resumed in (False, True):  # made in the first session, continued in the second
        ended.clear()
        with pytest.raises(DistmlError), tracked("mlflow"):
            tune_start(run_dir, resumed=resumed)
            tune_epoch(1, 1 + resumed)
            raise DistmlError("the cluster went away")
        parents, children = runs_of(store)
        assert [p.info.status for p in parents] == ["FAILED"] and len(children) == 1 + TUNE_K
        assert {run.info.status for run in children.values()} == {"FAILED"}
        folds = {children[f"trial 1 fold {f}"].info.run_id for f in range(TUNE_K)}
        assert set(ended[:TUNE_K]) == folds
        assert ended[TUNE_K:] == [children["trial 1"].info.run_id, parents[0].info.run_id]


def test_tensorboard_writes_a_tune_trials_folds_under_its_folder(tmp_path, warnings):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = make_run_folder(tmp_path, "tune-4")
    with tracked("tensorboard"):
        tune_start(run_dir)
        for epoch in range(1, TUNE_EPOCHS + 1):
            tune_epoch(1, epoch)
        tune_finish(1)
        tune_end(run_dir)

    assert warnings == []
    trial = run_dir / "tensorboard" / "trial_1"
    assert sorted(p.name for p in trial.iterdir() if p.is_dir()) == [f"fold_{f}" for f in range(TUNE_K)]
    for fold in range(TUNE_K):
        events = EventAccumulator(str(trial / f"fold_{fold}"))
        events.Reload()
        scalars = [(s.step, s.value) for s in events.Scalars("accuracy/val")]
        assert scalars == [(e, float(np.float32(v))) for e, v in fold_history(1, fold, "val_accuracy")]
