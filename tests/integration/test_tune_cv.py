"""Real tuning runs on a local Ray: 4 trials of 3 folds each of the MLP on scikit-learn's 1,797 8x8 digits, ASHA on
the cross-fold mean, then the interrupted run resumed from the command line."""

from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from distml.cli import app
from distml.config import ClusterConfig, TuneConfig
from distml.folds import fold_assignment
from distml.stats import corrected_interval
from distml.tune import run_tune

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from sklearn.datasets import load_digits

    data = load_digits()
    path = tmp_path_factory.mktemp("digits") / "digits.npz"
    np.savez(path, x=data.images.astype(np.float32), y=data.target)
    return path


# one trial at a time: with seed 0 the first trial drawn is a good one, so ASHA's rung-1 cutoff stops the two with a
# rate near 1e-5 after one epoch
def config_for(data: Path, out: Path) -> TuneConfig:
    return TuneConfig(
        params={"lr": "loguniform:1e-5:1e-1", "hidden": "choice:16,64"},
        data=f"npz:{data}",
        k=3,
        trials=4,
        epochs=3,
        grace_period=1,
        reduction_factor=2,
        seed=0,
        out=out,
        cluster=ClusterConfig(workers=1, max_failures=1),
    )


def test_tuning_ranks_k_fold_trials_on_their_cross_fold_mean_and_asha_stops_poor_ones(
    local_ray, digits, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # MLflow keeps a SQLite store's artifacts in ./mlruns
    config = replace(config_for(digits, tmp_path / "run"), then_train=True, track="mlflow")
    outcome = run_tune(config)
    run = outcome.run_dir
    assert outcome.complete and not outcome.failures

    trials = pd.read_csv(run / "trials.csv")
    assert len(trials) == 4 and trials["trial"].is_unique and (trials["status"] == "done").all()
    assert trials["lr"].between(1e-5, 1e-1).all() and set(trials["hidden"]) <= {16, 64}
    assert trials["stacked"].all()  # the MLP's 3 folds trained as one stacked model in each trial
    stopped = trials[trials["stopped_early"]]
    assert len(stopped) >= 1 and (stopped["epochs_run"] < 3).all()  # ASHA stopped at least one trial
    assert (trials.loc[~trials["stopped_early"], "epochs_run"] == 3).all()
    assert trials["mean_val_accuracy"].is_monotonic_decreasing  # ranked, best first

    # every trial's score is the mean over its 3 folds at its last epoch, with the corrected interval around it
    folds = pd.read_csv(run / "trial_folds.csv")
    assert len(folds) == 3 * trials["epochs_run"].sum()
    sizes = np.bincount(fold_assignment(np.load(digits)["y"], 3, 0))
    n_val, n_train = sizes.mean(), len(np.load(digits)["y"]) - sizes.mean()
    for row in trials.itertuples():
        last = folds[(folds["trial"] == row.trial) & (folds["epoch"] == row.epochs_run)]
        assert sorted(last["fold"]) == [0, 1, 2]
        mean, low, high = corrected_interval(last["val_accuracy"], n_train, n_val)
        assert row.mean_val_accuracy == pytest.approx(mean)
        assert row.corrected_ci95_low_val_accuracy == pytest.approx(low, rel=1e-3)
        assert row.corrected_ci95_high_val_accuracy == pytest.approx(high, rel=1e-3)

    best = json.loads((run / "best.json").read_text())
    top = trials.iloc[0]
    assert best["trial"] == top["trial"] and best["params"]["lr"] == pytest.approx(top["lr"])
    assert best["value"] == pytest.approx(top["mean_val_accuracy"]) and best["complete"]
    assert best["value"] > 0.8  # 3 epochs on 1,198 digits a fold: far above chance (0.1)
    assert (run / "metric_vs_params.png").stat().st_size > 10_000
    report = (run / "report.md").read_text()
    assert f"**{best['value']:.4f}**" in report and "![Cross-fold mean of val_accuracy" in report
    assert "data:image/png;base64," in (run / "report.html").read_text()  # the plot, embedded

    # MLflow: the search, a child run per trial, and under each trial a run per fold with its epochs
    from mlflow.tracking import MlflowClient

    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("distml").experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.info.run_name == run.name]
    assert len(parent) == 1
    trial_runs = {r.info.run_id: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    assert len(trial_runs) == 4
    fold_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in trial_runs]
    assert len(fold_runs) == 3 * 4
    by_number = {int(trial.rsplit("_", 1)[-1]): trial for trial in trials["trial"]}  # Tune's ids end in the number
    fold_rows = folds.set_index(["trial", "fold", "epoch"])
    for fold_run in fold_runs:
        _, number, _, fold = fold_run.info.run_name.split()  # "trial 3 fold 1"
        assert trial_runs[fold_run.data.tags["mlflow.parentRunId"]].info.run_name == f"trial {number}"
        history = MlflowClient().get_metric_history(fold_run.info.run_id, "val_accuracy")
        trial = by_number[int(number)]
        assert [m.step for m in history] == list(range(1, int(trials.set_index("trial").loc[trial, "epochs_run"]) + 1))
        expected = [fold_rows.loc[(trial, int(fold), m.step), "val_accuracy"] for m in history]
        assert [m.value for m in history] == pytest.approx(expected)

    # --then-train: the best configuration trained as `distml train` trains, and exported
    assert outcome.model_dir == run / "final" / "model" and (outcome.model_dir / "model.pt").is_file()
    results = json.loads((run / "final" / "results.json").read_text())
    assert results["accuracy"] > 0.8


def test_an_interrupted_search_resumes_from_the_command_line_keeping_finished_trials(
    local_ray, digits, tmp_path, trial_result_lines
):
    config = config_for(digits, tmp_path / "run")
    marker = tmp_path / "interrupted"

    class CtrlCAfterTheFirstTrial(logging.Handler):  # Ctrl-C as soon as the first trial is done (once)
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if ("finished" in message or "stopped early" in message) and not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGINT)

    logger = logging.getLogger("distml")
    handler = CtrlCAfterTheFirstTrial()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        assert not run_tune(config).complete
    except KeyboardInterrupt as stop:  # the run says how to finish it
        assert getattr(stop, "resume", None) == f"distml tune --resume {config.out}"
    finally:
        logger.removeHandler(handler)
    assert marker.exists()
    before = trial_result_lines(config.out)
    assert 1 <= len(before) < 4  # some trials finished, some never started

    result = CliRunner().invoke(app, ["tune", "--resume", str(config.out), "-q"])
    assert result.exit_code == 0, result.output
    assert "best lr=" in result.stdout and "4/4 trials done" in result.stdout
    trials = pd.read_csv(config.out / "trials.csv")
    assert len(trials) == 4 and (trials["status"] == "done").all()
    assert (trials["stopped_early"]).any()
    after = trial_result_lines(config.out)
    first = sorted(before)[0]
    assert after[first] == before[first]  # not one more epoch for the trial that had finished
    assert len(after) == 4


NETS = '''
import os

from torch import nn

class Net(nn.Module):
    """A small MLP whose process dies once, at its 25th training step (in epoch 2: 19 steps an epoch), the first time
    only, as a marker file records."""

    def __init__(self, num_classes, width, marker):
        super().__init__()
        self.marker, self.steps = marker, 0
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, num_classes))

    def forward(self, x):
        if self.training:
            self.steps += 1
            if self.steps == 25 and not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os._exit(1)
        return self.net(x)


def build(num_classes, width=32, marker=""):
    return Net(num_classes, width, marker)
'''


def test_folds_of_an_unstackable_model_train_one_at_a_time_a_lost_trial_retries_and_a_diverged_one_ranks_last(
    local_ray, digits, tmp_path
):
    nets = tmp_path / "nets.py"
    nets.write_text(NETS)
    marker = tmp_path / "killed-once"
    config = replace(
        config_for(digits, tmp_path / "run"),
        model=f"{nets}:build",
        model_kwargs={"marker": str(marker)},
        params={"lr": "choice:0.01,1e30", "width": "choice:16,32"},
        trials=3,
        epochs=2,
        scheduler="none",
    )
    outcome = run_tune(config)
    assert marker.exists()  # a trial's process died once
    trials = outcome.trials
    assert len(trials) == 3 and not trials["stacked"].any()
    assert set(trials["lr"]) == {0.01, 1e30}
    diverged = trials[trials["diverged"]]
    assert len(diverged) >= 1 and (diverged["lr"] == 1e30).all() and (diverged["status"] == "diverged").all()
    assert trials["diverged"].tolist() == sorted(trials["diverged"].tolist())  # ranked last
    healthy = trials[~trials["diverged"]]
    assert (healthy["status"] == "done").all() and (healthy["epochs_run"] == 2).all()
    assert (healthy["mean_val_accuracy"] > 0.5).all()
    assert trials["attempts"].max() == 2  # the trial whose process died, carried on from its epoch-1 checkpoint
    retried = trials.loc[trials["attempts"] == 2, "trial"].item()
    folds = outcome.trial_folds[outcome.trial_folds["trial"] == retried]
    assert sorted(zip(folds["fold"], folds["epoch"], strict=True)) == [(f, e) for f in range(3) for e in (1, 2)]
    best = json.loads((outcome.run_dir / "best.json").read_text())
    assert best["params"]["lr"] == 0.01 and not outcome.failures and outcome.complete


def test_nested_cross_validation_scores_each_outer_folds_choice_on_that_fold(local_ray, digits, tmp_path):
    from sklearn.model_selection import StratifiedKFold

    config = replace(
        config_for(digits, Path("nested")),  # a run folder inside --storage
        storage=str(tmp_path / "store"),
        outer_k=2,
        trials=2,
        epochs=2,
        scheduler="none",
        params={"lr": "loguniform:1e-3:1e-1"},
    )
    outcome = run_tune(config)
    run = outcome.run_dir
    assert run == tmp_path / "store" / "nested" and outcome.complete and not outcome.failures
    assert (run / "ray" / "outer_1" / "tune").is_dir()  # each outer fold's search state, under the run's storage

    labels = np.load(digits)["y"]
    outer = pd.read_csv(run / "outer.csv")
    assert outer["outer_fold"].tolist() == [0, 1]
    splits = list(StratifiedKFold(2, shuffle=True, random_state=0).split(labels, labels))
    assert outer["test_size"].tolist() == [len(test) for _, test in splits]
    assert (outer["epochs"] == 2).all() and outer["lr"].between(1e-3, 1e-1).all()
    assert (outer["val_accuracy"] > 0.8).all()  # each choice, retrained on its training part, on unseen digits
    for fold in (0, 1):
        inner = pd.read_csv(run / f"outer_{fold}" / "trials.csv")
        assert len(inner) == 2 and (inner["status"] == "done").all()
        assert outer.loc[fold, "lr"] == pytest.approx(inner.loc[0, "lr"])  # the inner search's best
        assert outer.loc[fold, "train_size"] == len(splits[fold][0])

    summary = json.loads((run / "outer.json").read_text())
    assert summary["mean"] == pytest.approx(outer["val_accuracy"].mean())
    assert summary["corrected_ci95_low"] <= summary["mean"] <= summary["corrected_ci95_high"]
    assert [c["lr"] for c in summary["chosen"]] == pytest.approx(outer["lr"].tolist())
    assert summary["stability"]["lr"]["of"] == "log10 values" and summary["stability"]["lr"]["spread"] >= 0
    report = (run / "report.md").read_text()
    assert f"val_accuracy **{summary['mean']:.4f}** over 2 of 2 outer folds" in report


def test_optunas_tpe_draws_the_configurations_and_every_trial_is_scored(local_ray, digits, tmp_path):
    config = replace(
        config_for(digits, tmp_path / "optuna"),
        search="optuna",
        trials=3,
        k=2,
        epochs=1,
        scheduler="none",
        params={"lr": "loguniform:1e-3:1e-1"},
    )
    outcome = run_tune(config)
    assert outcome.complete and not outcome.failures
    trials = pd.read_csv(outcome.run_dir / "trials.csv")
    assert len(trials) == 3 and (trials["status"] == "done").all() and trials["lr"].between(1e-3, 1e-1).all()
    assert trials["lr"].nunique() == 3 and (trials["mean_val_accuracy"] > 0.3).all()
    searcher = list((outcome.run_dir / "ray" / "tune").glob("searcher-state-*.pkl"))
    assert searcher, "Tune saved no searcher state: a resume would lose Optuna's study"
