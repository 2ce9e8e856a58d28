"""`distml train`: one model trained on MNIST's training set minus a stratified validation holdout, then tested."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from distml.atomic import write_json
from distml.config import check_training, paths_to_str
from distml.data import MNIST, load_mnist, normalize
from distml.errors import DistmlError
from distml.evaluation import record_trained_model
from distml.export import metadata
from distml.folds import check_val_fraction, holdout_assignment, stratified_subset
from distml.kfold import CONFIG_FILE, default_out, library_versions
from distml.models import MODELS
from distml.rundir import RunDir
from distml.train import EpochRecord, TrainSettings, fit, new_state


@dataclass(frozen=True)
class HoldoutConfig(TrainSettings):
    val_fraction: float = 0.1
    limit: int | None = None  # a stratified subset of the training images, for quick runs
    out: Path | None = None
    data_dir: Path | None = None

    def validate(self) -> None:
        if self.model not in MODELS:
            raise DistmlError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}", option="--model")
        check_training(self.epochs, self.batch_size, self.lr, self.lr_schedule)
        check_val_fraction(self.val_fraction)


@dataclass(frozen=True)
class HoldoutSplit:
    """The (possibly limited) training images, normalised, and which of them validate."""

    images: np.ndarray  # float32 (N, 1, 28, 28)
    labels: np.ndarray  # int64 (N,)
    assignment: np.ndarray  # 1: validation, 0: training

    @property
    def train_size(self) -> int:
        return int((self.assignment == 0).sum())

    @property
    def val_size(self) -> int:
        return int(self.assignment.sum())


@dataclass(frozen=True)
class TrainOutcome:
    run_dir: Path
    results: dict
    history: list[EpochRecord]
    wall_seconds: float


def holdout_split(dataset: MNIST, val_fraction: float, limit: int | None, seed: int) -> HoldoutSplit:
    keep = stratified_subset(dataset.train_labels, limit, seed) if limit else np.arange(len(dataset.train_labels))
    labels = dataset.train_labels[keep]
    return HoldoutSplit(normalize(dataset.train_images[keep]), labels, holdout_assignment(labels, val_fraction, seed))


def start_run(run: RunDir, command: str, options: dict, dataset: MNIST) -> None:
    """Create the run folder and write its config.json (call under the run's lock)."""
    run.create()
    write_json(
        run.path / CONFIG_FILE,
        {
            "command": command,
            "options": paths_to_str(options),
            "dataset": dataset.summary(),
            "versions": library_versions(),
            "created": datetime.now().isoformat(timespec="seconds"),
        },
    )


def epoch_line(name: str, record: EpochRecord, epochs: int) -> str:
    return (
        f"{name}: epoch {record.epoch}/{epochs} train_loss={record.train_loss:.4f} val_loss={record.val_loss:.4f} "
        f"val_acc={record.val_accuracy:.4f} ({record.seconds:.1f} s)"
    )


def run_train(config: HoldoutConfig, say: Callable[[str], None] = lambda message: None) -> TrainOutcome:
    """Train `config.model` with a validation holdout, evaluate it on the test set, save and export it."""
    started = time.perf_counter()
    config.validate()
    run = RunDir.fresh(config.out or default_out("train"), option="--out")  # fail before loading anything
    dataset = load_mnist(config.data_dir)
    say(f"data: {dataset.description}")
    split = holdout_split(dataset, config.val_fraction, config.limit, config.seed)
    say(f"training {config.model} on {split.train_size:,} images, validating on {split.val_size:,}")
    with run.lock():
        start_run(run, "train", asdict(config), dataset)
        state = new_state(config.train_settings, stream=0)
        images, labels = torch.from_numpy(split.images), torch.from_numpy(split.labels)
        train_index = torch.from_numpy(np.flatnonzero(split.assignment == 0))
        val_index = torch.from_numpy(np.flatnonzero(split.assignment == 1))
        fit(
            state,
            config.train_settings,
            images,
            labels,
            train_index,
            val_index,
            on_epoch=lambda state, record: say(epoch_line(config.model, record, config.epochs)),
        )
        say("evaluating on the test set and exporting the model")
        info = metadata(config.model, state.model, trained_with="distml train", data=dataset.source)
        results = record_trained_model(
            run.path, config.model, state.model, info, state.history, state.train_seconds, split.train_size, dataset
        )
    return TrainOutcome(run.path, results, state.history, time.perf_counter() - started)
