"""`distml sweep`: the learning-rate search from start to finish: data, holdout split (or, with --cv, K folds),
trials, table, plot, best rate, final model. The trials run on Ray Tune (distml.distributed.tune); what they train is
resnet.py's."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from distml import checkpoints, run_report, storage, tracking
from distml.atomic import write_csv, write_json
from distml.config import SweepConfig, check_track
from distml.data import MNIST, load_mnist, normalize
from distml.distributed import cluster
from distml.distributed import tune as tune_trials
from distml.errors import DistmlError, Interrupted
from distml.export import metadata, save_model
from distml.folds import SplitData, fold_assignment, holdout_assignment, stratified_subset
from distml.progress import RunEnded, RunStarted, publish, run_files, score_rows
from distml.resnet import build_resnet18, full_model
from distml.rundir import CONFIG_FILE, MODEL_DIR, RunDir, fresh_run_folder, library_versions
from distml.train import evaluate

log = logging.getLogger(__name__)

TRIALS_FILE = "trials.csv"
HISTORY_FILE = "history.csv"
TRIAL_FOLDS_FILE = "trial_folds.csv"  # with --cv: trial x fold x epoch
BEST_FILE = "best.json"
PLOT_FILE = "accuracy_vs_lr.png"

TRIAL_COLUMNS = [
    "trial",
    "lr",
    "best_val_accuracy",
    "best_val_loss",
    "epochs",
    "stopped_early",
    "diverged",
    "seconds",
    "status",
    "attempts",
    "error",
]
HISTORY_COLUMNS = ["trial", "lr", "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds"]
# with --cv, val_accuracy and val_loss are cross-fold means: each with the folds' std and the corrected 95% interval
# (distml.stats.corrected_interval), as the trial reported them (std_, ci_low_, ci_high_) and as the tables name them
CV_COLUMNS = {
    f"{reported}_{score}": f"{named}_{score}"
    for score in tune_trials.SCORES
    for reported, named in (("std", "std"), ("ci_low", "corrected_ci95_low"), ("ci_high", "corrected_ci95_high"))
}
TRIAL_FOLDS_COLUMNS = ["trial", "lr", "fold", *tune_trials.FOLD_COLUMNS]


# ---- tables ----


def _trial_row(record, epochs: int, cv: int | None) -> dict:
    history = record.history
    finished = record.status == "TERMINATED"
    diverged = record.diverged is not None
    status = "diverged" if diverged else {"TERMINATED": "done", "ERROR": "failed"}.get(record.status, "unfinished")
    row = {
        "trial": record.trial_id,
        "lr": record.lr,
        "best_val_accuracy": max((h["val_accuracy"] for h in history), default=math.nan),
        "best_val_loss": min((h["val_loss"] for h in history), default=math.nan),
        "epochs": len(history),  # those before a divergence
        "stopped_early": finished and not diverged and len(history) < epochs,
        "diverged": diverged,
        "seconds": history[-1]["train_seconds"] if history else 0.0,
        "status": status,
        "attempts": record.attempts,
        "error": record.error or record.diverged or "",
    }
    if cv is not None:  # each score's spread over the folds at the epoch of its best mean
        for score, pick in (("val_accuracy", max), ("val_loss", min)):
            best_epoch = pick(history, key=lambda h, score=score: h[score], default={})
            row.update({CV_COLUMNS[key]: best_epoch.get(key, math.nan) for key in CV_COLUMNS if key.endswith(score)})
    return row


def trial_table(records: list, epochs: int, cv: int | None = None) -> pd.DataFrame:
    """One row per trial, by learning rate; with `cv` (K folds) the std and corrected interval of each score too."""
    columns = TRIAL_COLUMNS if cv is None else [*TRIAL_COLUMNS[:4], *CV_COLUMNS.values(), *TRIAL_COLUMNS[4:]]
    frame = pd.DataFrame([_trial_row(r, epochs, cv) for r in records], columns=columns)
    return frame.sort_values("lr").reset_index(drop=True)


def history_table(records: list, cv: int | None = None) -> pd.DataFrame:
    """One row per trial and epoch; with `cv` the scores are cross-fold means, with their std and interval."""
    columns = HISTORY_COLUMNS if cv is None else [*HISTORY_COLUMNS, *CV_COLUMNS.values()]
    rows = [{"trial": r.trial_id, "lr": r.lr, **h} for r in records for h in r.history]
    frame = pd.DataFrame(rows).rename(columns=CV_COLUMNS).reindex(columns=columns)
    return frame.sort_values(["lr", "epoch"]).reset_index(drop=True)


def folds_table(records: list) -> pd.DataFrame:
    """With --cv: one row per trial, fold and epoch, the values each cross-fold mean is taken over."""
    rows = [{"trial": r.trial_id, "lr": r.lr, **row} for r in records for row in r.folds]
    frame = pd.DataFrame(rows, columns=TRIAL_FOLDS_COLUMNS)
    return frame.sort_values(["lr", "fold", "epoch"]).reset_index(drop=True)


def best_row(trials: pd.DataFrame, metric: str) -> pd.Series | None:
    """The trial with the best value of `metric` over its epochs, trials that diverged ranked after all the others
    (None when no trial reported an epoch)."""
    reported = trials[trials["epochs"] > 0]
    if reported.empty:
        return None
    ranked = reported.sort_values(["diverged", f"best_{metric}"], ascending=[True, metric == "val_loss"])
    return ranked.iloc[0]


# ---- the whole run ----


@dataclass(frozen=True)
class SweepOutcome:
    run_dir: Path
    trials: pd.DataFrame
    best: dict | None
    complete: bool
    failures: list[str]
    wall_seconds: float
    model_dir: Path | None = None


def _split_digest(split: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(split, dtype=np.int64).tobytes()).hexdigest()[:16]


def _split_data(dataset: MNIST, config: SweepConfig) -> SplitData:
    """The (possibly limited) training images, normalised, with a stratified holdout as fold 1, or with --cv their
    K stratified folds (folds.fold_assignment); K above the smallest class's count is refused."""
    images, labels = dataset.train_images, dataset.train_labels
    if config.train_images is not None:
        subset = stratified_subset(labels, config.train_images, config.seed)
        images, labels = images[subset], labels[subset]
    if config.cv is None:
        return SplitData(normalize(images), labels, holdout_assignment(labels, config.val_fraction, config.seed))
    try:
        assignment = fold_assignment(labels, config.cv, config.seed)
    except DistmlError as error:  # folds.check_k's, which names --k
        raise DistmlError(f"{error.message} among the training images", option="--cv") from None
    return SplitData(normalize(images), labels, assignment)


def _split_header(data: SplitData, config: SweepConfig) -> dict:
    """config.json's record of the split, whose digest a resume checks the data against."""
    if config.cv is None:
        train_index, val_index = data.indices(1)
        return {"train": len(train_index), "val": len(val_index), "digest": _split_digest(val_index)}
    return {"images": len(data.labels), "folds": config.cv, "digest": _split_digest(data.assignment)}


def _model_meta(config: SweepConfig, model: nn.Module, lr: float, trained_on: int, test, versions: dict) -> dict:
    """model.json of the final model: export.metadata's fields plus how the sweep trained it."""

    return metadata(
        "resnet18",
        model,
        image_size=config.image_size,
        weights=config.weights,
        freeze_backbone=config.freeze_backbone,
        lr=lr,
        backbone_lr=None if config.freeze_backbone else config.backbone_lr,
        epochs=config.epochs,
        batch_size=config.batch_size,
        trained_on_images=trained_on,
        test_accuracy=test.accuracy,
        test_loss=test.loss,
        source="distml sweep --then-finetune",
        versions=versions,
        created=datetime.now().isoformat(timespec="seconds"),
    )


def _write_results(folder: Path, config: SweepConfig, records: list) -> tuple[pd.DataFrame, dict | None, bool, list]:
    """trials.csv, history.csv, the plot and best.json; returns (trials, best, complete, failures)."""
    from distml import plots  # matplotlib's import is slow: only once there is something to draw

    trials = trial_table(records, config.epochs, config.cv)
    write_csv(folder / TRIALS_FILE, trials)
    write_csv(folder / HISTORY_FILE, history_table(records, config.cv))
    if config.cv is not None:
        write_csv(folder / TRIAL_FOLDS_FILE, folds_table(records))
    row = best_row(trials, config.metric)
    if trials["best_val_accuracy"].notna().any():  # nothing to draw when no trial reported an epoch
        plots.accuracy_vs_lr(trials, folder / PLOT_FILE, None if row is None else float(row["lr"]))
    # an interrupted sweep may not have created all its trials yet
    complete = len(trials) == config.trials and bool((trials["status"] != "unfinished").all())
    failures = [f"trial {t.trial}: {t.error}" for t in trials.itertuples() if t.status == "failed"]
    if row is None:
        return trials, None, complete, failures
    best = {
        "lr": float(row["lr"]),
        "metric": config.metric,
        "value": float(row[f"best_{config.metric}"]),
        "best_val_accuracy": float(row["best_val_accuracy"]),
        "best_val_loss": float(row["best_val_loss"]),
        "trial": row["trial"],
        "epochs": int(row["epochs"]),
        "diverged": bool(row["diverged"]),  # only when every trial that reported an epoch diverged
        "trials_done": int((trials["status"] == "done").sum()),
        "trials": config.trials,
        "complete": complete,
    }
    if config.cv is not None:  # the best value's spread over the folds, at its epoch
        best["cv"] = config.cv
        best.update(
            {key: float(row[f"{key}_{config.metric}"]) for key in ("std", "corrected_ci95_low", "corrected_ci95_high")}
        )
    write_json(folder / BEST_FILE, best)
    return trials, best, complete, failures


def run_sweep(config: SweepConfig, resume: Path | None = None, cluster_overrides: dict | None = None) -> SweepOutcome:
    """Search the head's learning rate and write trials.csv, history.csv, the plot and best.json.

    With `resume`, the options come from that folder's config.json, the `cluster_overrides` (ClusterConfig fields)
    replacing the saved ones (the address is only ever the override's); finished trials are kept, the others carry
    on from their last epoch checkpoint. `config.track` records the run in an experiment tracker (this call's
    choice, with `resume` too).
    """
    check_track(config.track)
    with tracking.tracked(config.track):
        return _run_sweep(config, resume, cluster_overrides or {})


def _run_sweep(config: SweepConfig, resume: Path | None, cluster_overrides: dict) -> SweepOutcome:
    started = time.perf_counter()
    saved = None
    if resume is not None:
        run, config, saved = RunDir.resumed(resume, "sweep", SweepConfig, storage_given=config.storage)
        config = replace(config, cluster=config.cluster.with_overrides(**cluster_overrides))
    config.validate()
    if resume is None:
        run = RunDir.fresh(fresh_run_folder("sweep", config.out, config.storage), option="--out")
    cloud = config.storage is not None and storage.is_cloud(config.storage)
    run.check_storage(config.storage)
    dataset = load_mnist(config.data_dir)
    data = _split_data(dataset, config)  # a --cv the data cannot split is refused here, before Ray starts
    split = _split_header(data, config)
    if config.cv is None:
        scored = f"sweeping on {split['train']:,} training and {split['val']:,} validation images"
    else:
        scored = f"scoring each rate by {config.cv}-fold cross-validation on {split['images']:,} images"
    log.info(f"data: {dataset.description}; {scored}")
    torch.manual_seed(config.seed)
    initial_state = build_resnet18(config.weights, image_size=config.image_size).state_dict()

    started_ray = cluster.connect(config.cluster.address, quiet=True)
    try:
        plan = cluster.plan_on_cluster(config.cluster)
        with run.lock():
            if not cloud:
                cluster.check_shared(run.path, option="--storage" if config.storage else "--out")
            if saved is None:
                run.write_header("sweep", config.to_dict(), dataset.summary(), split=split, plan=plan.__dict__)
            elif saved["split"]["digest"] != split["digest"]:
                raise DistmlError(f"{run.path}: the data no longer give the saved split", option="--resume")
            mode = "cached backbone features" if config.cached_features else "the backbone run in every trial"
            if config.cv is not None:
                mode += f", each rate scored by its {config.cv}-fold mean"
            header = json.loads((run.path / CONFIG_FILE).read_text())
            units = [f"trial {number}" for number in range(config.trials)]
            publish(
                log,
                f"{config.trials} trials, lr log-uniform in [{config.lr_min:g}, {config.lr_max:g}], "
                f"{config.epochs} epochs, ASHA on {config.metric} (grace {config.grace_period}, reduction "
                f"{config.reduction_factor:g}); {plan.concurrent_folds} at a time, "
                + ("backbone frozen, " + mode if config.freeze_backbone else "backbone trained too"),
                RunStarted(
                    "sweep",
                    str(run.path),
                    units,
                    config.trials,
                    config.epochs,
                    header["options"],
                    header["dataset"],
                    saved is not None,
                ),
            )
            data_ref, initial_ref = tune_trials.share_sweep_data(config, data, initial_state, plan)
            stamp = checkpoints.run_stamp(run.run_id, config)
            records = tune_trials.run_sweep_trials(
                config, data_ref, initial_ref, plan, run.ray_storage(config.storage), stamp
            )
            trials, best, complete, failures = _write_results(run.path, config, records)
            model_dir = None
            if config.then_finetune and complete and best is not None:
                if best["diverged"]:
                    log.info("every trial that reported an epoch diverged: no final model")
                else:
                    model_dir = _then_finetune(
                        config, best, dataset, data, data_ref, initial_ref, initial_state, plan, run
                    )
                    write_json(run.path / BEST_FILE, best)
            run_report.build(run.path)
            if cloud:
                uploaded_to = storage.upload(run.path, run.ray_storage(config.storage), skip=(run.storage.name,))
                log.info(f"results uploaded to {storage.redacted(uploaded_to)}")
    except KeyboardInterrupt as stop:  # Ctrl-C, or a stop signal the CLI raises as one
        resume_with = f"distml sweep --resume {run.path}" if (run.path / CONFIG_FILE).is_file() else None
        raise Interrupted.of(stop, resume_with, log) from None
    finally:
        if started_ray:
            cluster.shutdown()
    status = "finished" if complete else "failed" if failures else "interrupted"
    best_scores = {key if key.startswith("best_") else f"best_{key}": value for key, value in (best or {}).items()}
    ended = RunEnded("sweep", str(run.path), status, score_rows(best_scores), run_files(run.path))
    publish(log, f"{run.path}: {status}", ended)
    return SweepOutcome(run.path, trials, best, complete, failures, time.perf_counter() - started, model_dir)


def _then_finetune(config, best, dataset, data, data_ref, initial_ref, initial_state, plan, run) -> Path:
    """Train at the best rate on every training image, test it, and export it into the run's model/ folder."""
    log.info(f"final model: lr={best['lr']:.3g}, {config.epochs} epochs on every training image")
    trained, _ = tune_trials.final_fit(config, best["lr"], data_ref, initial_ref, plan)
    model = full_model(config, initial_state, trained)
    test = evaluate(model, torch.from_numpy(normalize(dataset.test_images)), torch.from_numpy(dataset.test_labels))
    meta = _model_meta(config, model, best["lr"], len(data.labels), test, library_versions())
    save_model(run.path / MODEL_DIR, model, meta)
    best.update(test_accuracy=test.accuracy, test_loss=test.loss, model=str(run.path / MODEL_DIR))
    log.info(f"final model: test accuracy {test.accuracy:.4f} on {len(dataset.test_labels):,} images")
    return run.path / MODEL_DIR
