"""Real sweeps on a local Ray: 3 trials on 1,000 images of the shipped sample, random weights, 32-pixel images."""

from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import replace

import pandas as pd
import pytest
import torch

from distml.config import ClusterConfig, SweepConfig
from distml.data import load_mnist, normalize
from distml.errors import Interrupted
from distml.run_report import REPORT_FILE
from distml.stats import corrected_interval
from distml.sweep import CV_COLUMNS, run_sweep

pytestmark = pytest.mark.integration

# one trial at a time: with seed 0 the best rate is drawn first, so ASHA's rung-1 cutoff then stops the others
CONFIG = SweepConfig(
    trials=3,
    epochs=3,
    grace_period=1,
    reduction_factor=2,
    weights="none",
    image_size=32,
    train_images=1000,
    seed=0,
    cluster=ClusterConfig(workers=1, max_failures=1),
)


def test_sweep_finds_the_best_rate_stops_poor_trials_and_exports_the_model(
    local_ray, sample_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # MLflow keeps a SQLite store's artifacts in ./mlruns
    config = replace(CONFIG, data_dir=sample_dir, out=tmp_path / "run", then_finetune=True, track="mlflow")
    outcome = run_sweep(config)
    run = outcome.run_dir
    assert outcome.complete and not outcome.failures

    trials = pd.read_csv(run / "trials.csv")
    assert len(trials) == 3 and trials["trial"].is_unique and (trials["status"] == "done").all()
    assert trials["lr"].between(config.lr_min, config.lr_max).all() and trials["lr"].is_monotonic_increasing
    assert trials["epochs"].between(1, 3).all() and (trials["seconds"] > 0).all()
    stopped = trials[trials["stopped_early"]]
    assert len(stopped) >= 1 and (stopped["epochs"] < 3).all()  # ASHA stopped at least one trial
    assert (trials.loc[~trials["stopped_early"], "epochs"] == 3).all()
    history = pd.read_csv(run / "history.csv")
    assert (
        history.groupby("trial").size().sort_index().tolist()
        == trials.set_index("trial")["epochs"].sort_index().tolist()
    )

    best = json.loads((run / "best.json").read_text())
    top = trials.loc[trials["best_val_accuracy"].idxmax()]
    assert best["lr"] == pytest.approx(top["lr"]) and best["trial"] == top["trial"]
    assert best["best_val_accuracy"] == pytest.approx(trials["best_val_accuracy"].max())
    assert best["best_val_accuracy"] > 0.3  # random backbone, 900 images: well above chance (0.1)
    assert (run / "accuracy_vs_lr.png").stat().st_size > 10_000

    # tracked in MLflow: the sweep as the parent, a child per trial with every epoch it ran
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("distml").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 3 and {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert parent.data.metrics["best_lr_mean"] == pytest.approx(best["lr"])
    epochs_run = sorted(len(client.get_metric_history(c.info.run_id, "val_accuracy")) for c in children)
    assert epochs_run == sorted(trials["epochs"].tolist())

    # --then-finetune: the exported program scores the test accuracy the metadata claims
    meta = json.loads((run / "model" / "model.json").read_text())
    assert meta["architecture"] == "resnet18" and meta["classes"] == [str(d) for d in range(10)]
    assert meta["lr"] == pytest.approx(best["lr"]) and meta["image_size"] == 32
    dataset = load_mnist(sample_dir)
    from distml.export import load_program

    scripted = load_program(run / "model")
    with torch.no_grad():
        predictions = scripted(torch.from_numpy(normalize(dataset.test_images))).argmax(1).numpy()
    assert (predictions == dataset.test_labels).mean() == pytest.approx(meta["test_accuracy"], abs=1e-3)
    assert meta["test_accuracy"] > 0.3


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(
    local_ray, sample_dir, tmp_path, trial_result_lines
):
    config = replace(CONFIG, data_dir=sample_dir, out=tmp_path / "run")
    marker = tmp_path / "interrupted"

    ended: list[str] = []  # the trials that finished or were stopped early before the Ctrl-C

    class CtrlCAfterTheFirstTrial(logging.Handler):  # Ctrl-C as soon as the first trial is done (once)
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if ("finished" in message or "stopped early" in message) and not marker.exists():
                ended.append(message.split()[1])  # "trial <id> lr=...: finished"
                marker.touch()
                os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    logger = logging.getLogger("distml")
    handler = CtrlCAfterTheFirstTrial()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.raises(Interrupted) as stopped:  # Tune installs no handler of its own: a KeyboardInterrupt
            run_sweep(config)
    finally:
        logger.removeHandler(handler)
    run_dir = config.out
    assert stopped.value.signum == signal.SIGINT
    assert stopped.value.resume == f"distml sweep --resume {run_dir}"
    assert signal.getsignal(signal.SIGINT) is before  # Tune leaves no handler of its own behind
    lines_before = trial_result_lines(run_dir)
    assert len(ended) == 1 and ended[0] in lines_before

    resumed = run_sweep(replace(SweepConfig(), out=None), resume=run_dir)
    assert resumed.complete and not resumed.failures
    assert (resumed.trials["status"] == "done").all() and len(resumed.trials) == 3
    lines_after = trial_result_lines(run_dir)
    assert lines_after[ended[0]] == lines_before[ended[0]]  # not one more epoch for the finished trial


def test_a_cv_sweep_ranks_rates_by_their_cross_fold_means(local_ray, sample_dir, tmp_path):
    config = replace(CONFIG, trials=2, epochs=2, train_images=600, cv=3, data_dir=sample_dir, out=tmp_path / "run")
    outcome = run_sweep(config)
    run = outcome.run_dir
    assert outcome.complete and not outcome.failures

    trials = pd.read_csv(run / "trials.csv")
    assert len(trials) == 2 and (trials["status"] == "done").all()
    assert trials[list(CV_COLUMNS.values())].notna().all().all()
    inside = trials["corrected_ci95_low_val_accuracy"] <= trials["best_val_accuracy"]
    assert (inside & (trials["best_val_accuracy"] <= trials["corrected_ci95_high_val_accuracy"])).all()

    # every epoch's reported score is the mean over its 3 folds' own
    history = pd.read_csv(run / "history.csv").set_index(["trial", "epoch"])
    folds = pd.read_csv(run / "trial_folds.csv")
    assert (folds.groupby(["trial", "epoch"])["fold"].nunique() == 3).all() and set(folds["fold"]) == {0, 1, 2}
    means = folds.groupby(["trial", "epoch"])[["val_accuracy", "val_loss"]].mean()
    assert len(means) == len(history)
    pd.testing.assert_frame_equal(means, history.loc[means.index, ["val_accuracy", "val_loss"]], rtol=1e-9)

    best = json.loads((run / "best.json").read_text())
    assert best["cv"] == 3 and best["trial"] == trials.loc[trials["best_val_accuracy"].idxmax(), "trial"]
    best_epoch = int(history.loc[best["trial"], "val_accuracy"].idxmax())
    fold_scores = folds[(folds["trial"] == best["trial"]) & (folds["epoch"] == best_epoch)]["val_accuracy"]
    assert best["best_val_accuracy"] == pytest.approx(fold_scores.mean())
    assert best["std"] == pytest.approx(fold_scores.std(ddof=1))
    # the folds' mean sizes: 400 training and 200 validation images
    _, low, high = corrected_interval(fold_scores.to_numpy(), 400, 200)
    assert (best["corrected_ci95_low"], best["corrected_ci95_high"]) == pytest.approx((low, high))
    assert best["best_val_accuracy"] > 0.15  # 600 images scored: over 4 standard errors above chance (0.1)
    assert "corrected 95% interval" in (run / REPORT_FILE).read_text()
