"""`distml train`: one model trained on the data minus a stratified validation holdout, then tested and exported."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distml import run_report, tracking
from distml.config import CALLABLE_PREFIX, HoldoutConfig
from distml.data import MNIST, normalize
from distml.datasets import Dataset
from distml.evaluation import record_trained_model
from distml.export import model_metadata
from distml.folds import SplitData, holdout_assignment, stratified_subset
from distml.models import model_label
from distml.progress import RunEnded, RunStarted, UnitEnded, publish, publish_epoch, run_files, score_rows
from distml.recipe import Given, prepare
from distml.rundir import RunDir, default_out
from distml.train import Diverged, EpochRecord, fit, new_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutcome:
    run_dir: Path
    results: dict
    history: list[EpochRecord]
    wall_seconds: float


def holdout_split(dataset: MNIST, val_fraction: float, limit: int | None, seed: int) -> SplitData:
    """MNIST's (possibly limited) training images, normalised, with a stratified holdout as fold 1."""
    keep = stratified_subset(dataset.train_labels, limit, seed) if limit else np.arange(len(dataset.train_labels))
    labels = dataset.train_labels[keep]
    return SplitData(normalize(dataset.train_images[keep]), labels, holdout_assignment(labels, val_fraction, seed))


def dataset_holdout(dataset: Dataset, val_fraction: float, limit: int | None, seed: int) -> SplitData:
    """A dataset's (possibly limited) examples with a stratified holdout as fold 1."""
    keep = stratified_subset(dataset.labels, limit, seed) if limit else np.arange(dataset.size)
    labels = dataset.labels[keep]
    return SplitData(dataset.inputs[keep], labels, holdout_assignment(labels, val_fraction, seed))


def run_train(config: HoldoutConfig, given: Given = Given()) -> TrainOutcome:
    """Train `config.model` with a validation holdout, evaluate it on the test set (on the holdout when there is no
    test set), save and export it. `given`: the objects the Python API was handed (see recipe.Given).

    A loss that stops being finite raises train.Diverged, naming the model, the epoch and the rate; nothing is exported.
    """
    config.validate()
    with tracking.tracked(config.track):
        return _run_train(config, given)


def _run_train(config: HoldoutConfig, given: Given) -> TrainOutcome:
    started = time.perf_counter()
    run = RunDir.fresh(config.out or default_out("train"), option="--out")  # fail before loading anything
    loaded = prepare(config, given)
    dataset, recipe = loaded.dataset, loaded.recipe
    log.info(f"data: {dataset.description}")
    split = dataset_holdout(dataset, config.val_fraction, config.limit, config.seed)
    label = model_label(recipe.model).removeprefix(CALLABLE_PREFIX)
    log.info(f"training {label} on {split.train_size:,} examples, validating on {split.val_size:,}")
    with run.lock():
        summary = dataset.summary()
        run.write_header("train", config.to_dict(), summary, classes=list(dataset.classes))
        begun = RunStarted("train", str(run.path), [label], 1, config.epochs, config.to_dict(), summary, False)
        publish(log, f"{run.path}: training {label}", begun)
        inputs, labels = torch.from_numpy(split.inputs), torch.from_numpy(split.labels)
        train_index, val_index = (torch.from_numpy(part) for part in split.indices(1))
        build = lambda: recipe.for_fold(inputs, train_index)  # noqa: E731
        state = new_state(config.train_settings, 0, "cpu", build, recipe.optimizer, recipe.loss)
        try:
            fit(
                state,
                config.train_settings,
                inputs,
                labels,
                train_index,
                val_index,
                on_epoch=lambda state, record: publish_epoch(log, label, 0, record, config.epochs),
            )
        except Diverged as stop:
            raise Diverged(stop.divergence, label) from None
        log.info("evaluating on the held-out examples and exporting the model")
        if loaded.test is not None:
            held_out = (loaded.test.inputs, loaded.test.labels)
        else:
            val_rows = split.indices(1)[1]
            held_out = (split.inputs[val_rows], split.labels[val_rows])
        results = record_trained_model(
            run.path,
            label,
            state.model,
            model_metadata(recipe, state.model, dataset, trained_with="distml train"),
            state.history,
            state.train_seconds,
            split.train_size,
            held_out,
            evaluated_on="test" if loaded.test else "validation",
            classes=list(dataset.classes),
        )
        run_report.build(run.path)
    publish(log, f"{label}: finished, {results['accuracy']:.4f} accuracy", UnitEnded(label, 0, results))
    ended = RunEnded("train", str(run.path), "finished", score_rows(results), run_files(run.path))
    publish(log, f"{run.path}: finished", ended)
    return TrainOutcome(run.path, results, state.history, time.perf_counter() - started)
