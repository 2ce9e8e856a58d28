"""The learning-rate sweep from start to finish: data, holdout split, trials, table, plot, best rate, final model.

Ray stays in distributed.py. The plain torch pieces every trial uses (its model, its optimizer, the frozen
backbone's features) are here, so a unit test runs them without a cluster.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from distml.atomic import write_csv, write_json
from distml.config import SweepConfig
from distml.data import MNIST, NUM_CLASSES, load_mnist, normalize
from distml.errors import DistmlError
from distml.optim import Adam
from distml.resnet import HeadOnFrozenBackbone, MnistResNet, backbone, build_resnet18, head_and_backbone
from distml.rundir import RunDir
from distml.train import TrainState, evaluate, predict

CONFIG_FILE = "config.json"
TRIALS_FILE = "trials.csv"
HISTORY_FILE = "history.csv"
BEST_FILE = "best.json"
PLOT_FILE = "accuracy_vs_lr.png"
MODEL_DIR = "model"
FEATURES = 512  # ResNet18's feature width, the head's input

TRIAL_COLUMNS = [
    "trial",
    "lr",
    "best_val_accuracy",
    "best_val_loss",
    "epochs",
    "stopped_early",
    "seconds",
    "status",
    "attempts",
    "error",
]
HISTORY_COLUMNS = ["trial", "lr", "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds"]


# ---- plain torch: what a trial trains ----


def holdout_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (training, validation) indices; the same seed gives the same split."""
    from sklearn.model_selection import train_test_split  # here, not at the top: trial processes never load sklearn

    indices = np.arange(len(labels))
    train_index, val_index = train_test_split(
        indices, test_size=val_fraction, stratify=labels, random_state=seed, shuffle=True
    )
    return np.sort(train_index), np.sort(val_index)


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of `size` images with the class proportions of the whole (all of them when size >= N)."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    if size >= len(labels):
        return indices
    subset, _ = train_test_split(indices, train_size=size, stratify=labels, random_state=seed, shuffle=True)
    return np.sort(subset)


def resnet_from_state(config: SweepConfig, initial_state: dict) -> MnistResNet:
    model = build_resnet18("none", NUM_CLASSES, config.image_size)
    model.load_state_dict(initial_state)
    return model


@torch.no_grad()
def backbone_features(config: SweepConfig, initial_state: dict, images: torch.Tensor) -> torch.Tensor:
    """(N, 512) features of normalised (N, 1, 28, 28) images, from the backbone in eval mode."""
    frozen = backbone(resnet_from_state(config, initial_state)).to(images.device)
    return predict(frozen, images, batch_size=512)


def trial_state(config: SweepConfig, lr: float, initial_state: dict | None, device: torch.device) -> TrainState:
    """A trial's model, optimizer and shuffling generator.

    Every trial starts from the same head and shuffles in the same order, so the learning rate is the only
    difference between them. With cached features the model is the head alone (the inputs are the features);
    with --uncached it is the head on the frozen backbone; with the backbone unfrozen, the whole ResNet18,
    its backbone at --backbone-lr.
    """
    torch.manual_seed(config.seed)
    head = nn.Linear(FEATURES, NUM_CLASSES)
    if config.cached_features:
        model: nn.Module = head
    elif config.freeze_backbone:
        model = HeadOnFrozenBackbone(backbone(resnet_from_state(config, initial_state)), head)
    else:
        model = resnet_from_state(config, initial_state)
        model.net.fc = head
    model = model.to(device)
    if config.freeze_backbone:
        groups = [{"params": head.parameters(), "lr": lr}]
    else:
        head_params, backbone_params = head_and_backbone(model)
        groups = [{"params": backbone_params, "lr": config.backbone_lr}, {"params": head_params, "lr": lr}]
    optimizer = Adam(groups, lr=lr)
    return TrainState(model, optimizer, torch.Generator().manual_seed(config.seed))


def full_model(config: SweepConfig, initial_state: dict, trained: nn.Module) -> MnistResNet:
    """The whole classifier (input adapter, backbone, head) from what a trial trained."""
    if not config.freeze_backbone:
        return trained
    model = resnet_from_state(config, initial_state)
    model.net.fc = trained.head if isinstance(trained, HeadOnFrozenBackbone) else trained
    return model


# ---- tables ----


def _trial_row(record, epochs: int) -> dict:
    history = record.history
    finished = record.status == "TERMINATED"
    return {
        "trial": record.trial_id,
        "lr": record.lr,
        "best_val_accuracy": max((h["val_accuracy"] for h in history), default=math.nan),
        "best_val_loss": min((h["val_loss"] for h in history), default=math.nan),
        "epochs": len(history),
        "stopped_early": finished and len(history) < epochs,
        "seconds": history[-1]["train_seconds"] if history else 0.0,
        "status": {"TERMINATED": "done", "ERROR": "failed"}.get(record.status, "unfinished"),
        "attempts": record.attempts,
        "error": record.error or "",
    }


def trial_table(records: list, epochs: int) -> pd.DataFrame:
    """One row per trial, by learning rate."""
    frame = pd.DataFrame([_trial_row(r, epochs) for r in records], columns=TRIAL_COLUMNS)
    return frame.sort_values("lr").reset_index(drop=True)


def history_table(records: list) -> pd.DataFrame:
    rows = [{"trial": r.trial_id, "lr": r.lr, **h} for r in records for h in r.history]
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS).sort_values(["lr", "epoch"]).reset_index(drop=True)


def best_row(trials: pd.DataFrame, metric: str) -> pd.Series | None:
    """The trial with the best value of `metric` over its epochs (None when no trial reported an epoch)."""
    reported = trials[trials["epochs"] > 0]
    if reported.empty:
        return None
    column = f"best_{metric}"
    return reported.loc[reported[column].idxmax() if metric == "val_accuracy" else reported[column].idxmin()]


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


def _split_digest(val_index: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(val_index, dtype=np.int64).tobytes()).hexdigest()[:16]


def _training_data(dataset: MNIST, config: SweepConfig) -> tuple[np.ndarray, np.ndarray]:
    images, labels = dataset.train_images, dataset.train_labels
    if config.train_images is not None:
        subset = stratified_subset(labels, config.train_images, config.seed)
        images, labels = images[subset], labels[subset]
    return images, labels


def _model_meta(config: SweepConfig, model: nn.Module, lr: float, trained_on: int, test, versions: dict) -> dict:
    """model.json of the final model: export.metadata's fields plus how the sweep trained it."""
    from distml.export import metadata

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
    from distml import plots  # matplotlib only when there is something to draw

    trials = trial_table(records, config.epochs)
    write_csv(folder / TRIALS_FILE, trials)
    write_csv(folder / HISTORY_FILE, history_table(records))
    row = best_row(trials, config.metric)
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
        "trials_done": int((trials["status"] == "done").sum()),
        "trials": config.trials,
        "complete": complete,
    }
    write_json(folder / BEST_FILE, best)
    return trials, best, complete, failures


def run_sweep(
    config: SweepConfig, say: Callable[[str], None] = lambda message: None, resume: Path | None = None
) -> SweepOutcome:
    """Search the head's learning rate and write trials.csv, history.csv, the plot and best.json.

    With `resume`, the options come from that folder's config.json; finished trials are kept, the others carry
    on from their last epoch checkpoint.
    """
    from distml import distributed  # ray only when a run really starts
    from distml.kfold import default_out, library_versions

    started = time.perf_counter()
    if resume is not None:
        run, config, saved = RunDir.resumed(resume, "sweep", SweepConfig)
    config.validate()
    if resume is None:
        run = RunDir.fresh(config.out or default_out("sweep"), option="--out")

    dataset = load_mnist(config.data_dir)
    images, labels = _training_data(dataset, config)
    train_index, val_index = holdout_split(labels, config.val_fraction, config.seed)
    say(
        f"data: {dataset.description}; sweeping on {len(train_index):,} training and {len(val_index):,} "
        f"validation images"
    )
    torch.manual_seed(config.seed)
    initial_state = build_resnet18(config.weights, NUM_CLASSES, config.image_size).state_dict()

    started_ray = distributed.connect(config.cluster.address, quiet=True)
    try:
        plan = distributed.plan_on_cluster(config.cluster, say)
        with run.lock():
            if resume is None:
                run.create()
                write_json(
                    run.path / CONFIG_FILE,
                    {
                        "command": "sweep",
                        "options": config.to_dict(),
                        "dataset": dataset.summary(),
                        "split": {"train": len(train_index), "val": len(val_index), "digest": _split_digest(val_index)},
                        "plan": plan.__dict__,
                        "versions": library_versions(),
                        "created": datetime.now().isoformat(timespec="seconds"),
                    },
                )
            elif saved["split"]["digest"] != _split_digest(val_index):
                raise DistmlError(f"{run.path}: the data no longer give the saved holdout split", option="--resume")
            mode = "cached backbone features" if config.cached_features else "the backbone run in every trial"
            say(
                f"{config.trials} trials, lr log-uniform in [{config.lr_min:g}, {config.lr_max:g}], "
                f"{config.epochs} epochs, ASHA on {config.metric} (grace {config.grace_period}, reduction "
                f"{config.reduction_factor:g}); {plan.concurrent_folds} at a time, "
                + ("backbone frozen, " + mode if config.freeze_backbone else "backbone trained too")
            )
            data = distributed.SweepData(normalize(images), labels, train_index, val_index)
            data_ref, initial_ref = distributed.share_sweep_data(config, data, initial_state, plan, say)
            records = distributed.run_sweep_trials(config, data_ref, initial_ref, plan, run.storage, say)
            trials, best, complete, failures = _write_results(run.path, config, records)
            model_dir = None
            if config.then_finetune and complete and best is not None:
                model_dir = _then_finetune(
                    config, best, dataset, labels, data_ref, initial_ref, initial_state, plan, run, say
                )
                write_json(run.path / BEST_FILE, best)
    finally:
        if started_ray:
            distributed.shutdown()
    return SweepOutcome(run.path, trials, best, complete, failures, time.perf_counter() - started, model_dir)


def _then_finetune(config, best, dataset, labels, data_ref, initial_ref, initial_state, plan, run, say) -> Path:
    """Train at the best rate on every training image, test it, and export it into the run's model/ folder."""
    from distml import distributed
    from distml.export import save_model
    from distml.kfold import library_versions

    say(f"final model: lr={best['lr']:.3g}, {config.epochs} epochs on every training image")
    trained, _ = distributed.final_fit(config, best["lr"], data_ref, initial_ref, plan)
    model = full_model(config, initial_state, trained)
    test = evaluate(model, torch.from_numpy(normalize(dataset.test_images)), torch.from_numpy(dataset.test_labels))
    meta = _model_meta(config, model, best["lr"], len(labels), test, library_versions())
    save_model(run.path / MODEL_DIR, model, meta)
    best.update(test_accuracy=test.accuracy, test_loss=test.loss, model=str(run.path / MODEL_DIR))
    say(f"final model: test accuracy {test.accuracy:.4f} on {len(dataset.test_labels):,} images")
    return run.path / MODEL_DIR
