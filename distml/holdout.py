"""`distml train`: one model trained on MNIST's training set minus a stratified validation holdout, then tested."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distml.config import HoldoutConfig
from distml.data import MNIST, load_mnist, normalize
from distml.evaluation import record_trained_model
from distml.export import metadata
from distml.folds import SplitData, holdout_assignment, stratified_subset
from distml.progress import epoch_line
from distml.rundir import RunDir, default_out
from distml.train import EpochRecord, fit, new_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutcome:
    run_dir: Path
    results: dict
    history: list[EpochRecord]
    wall_seconds: float


def holdout_split(dataset: MNIST, val_fraction: float, limit: int | None, seed: int) -> SplitData:
    """The (possibly limited) training images, normalised, with a stratified holdout as fold 1."""
    keep = stratified_subset(dataset.train_labels, limit, seed) if limit else np.arange(len(dataset.train_labels))
    labels = dataset.train_labels[keep]
    return SplitData(normalize(dataset.train_images[keep]), labels, holdout_assignment(labels, val_fraction, seed))


def run_train(config: HoldoutConfig) -> TrainOutcome:
    """Train `config.model` with a validation holdout, evaluate it on the test set, save and export it."""
    started = time.perf_counter()
    config.validate()
    run = RunDir.fresh(config.out or default_out("train"), option="--out")  # fail before loading anything
    dataset = load_mnist(config.data_dir)
    log.info(f"data: {dataset.description}")
    split = holdout_split(dataset, config.val_fraction, config.limit, config.seed)
    log.info(f"training {config.model} on {split.train_size:,} images, validating on {split.val_size:,}")
    with run.lock():
        run.write_header("train", config.to_dict(), dataset.summary())
        state = new_state(config.train_settings, stream=0)
        train_index, val_index = (torch.from_numpy(part) for part in split.indices(1))
        fit(
            state,
            config.train_settings,
            torch.from_numpy(split.inputs),
            torch.from_numpy(split.labels),
            train_index,
            val_index,
            on_epoch=lambda state, record: log.info(epoch_line(config.model, record, config.epochs)),
        )
        log.info("evaluating on the test set and exporting the model")
        info = metadata(config.model, state.model, trained_with="distml train", data=dataset.source)
        results = record_trained_model(
            run.path, config.model, state.model, info, state.history, state.train_seconds, split.train_size, dataset
        )
    return TrainOutcome(run.path, results, state.history, time.perf_counter() - started)
