"""Typed, validated configuration. Dicts appear only at the Ray boundary (`to_dict`/`from_dict`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from distml.errors import DistmlError
from distml.models import MODELS
from distml.train import TrainSettings


def _positive(value: float, option: str) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise DistmlError(f"must be positive, got {value}", option=option)


def _non_negative(value: float, option: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise DistmlError(f"must be zero or more, got {value}", option=option)


@dataclass(frozen=True)
class ClusterConfig:
    """Where and with what resources the work runs."""

    address: str | None = None  # None: start a local Ray (or use RAY_ADDRESS)
    workers: int = 2  # fold trainers at once
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # None: one GPU per worker when the cluster has GPUs
    workers_per_fold: int = 1  # > 1: a Ray Train TorchTrainer of that many DDP workers per fold
    max_failures: int = 2

    def validate(self) -> None:
        if self.workers < 1:
            raise DistmlError(f"must be at least 1, got {self.workers}", option="--workers")
        _positive(self.cpus_per_worker, "--cpus-per-worker")
        if self.gpus_per_worker is not None:
            _non_negative(self.gpus_per_worker, "--gpus-per-worker")
        if self.workers_per_fold < 1:
            raise DistmlError(f"must be at least 1, got {self.workers_per_fold}", option="--workers-per-fold")
        if self.max_failures < 0:
            raise DistmlError(f"must be zero or more, got {self.max_failures}", option="--max-failures")


@dataclass(frozen=True)
class KFoldConfig:
    k: int = 5
    model: str = "mlp"
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    out: Path | None = None
    data_dir: Path | None = None
    cluster: ClusterConfig = ClusterConfig()

    def validate(self) -> None:
        if self.k < 2:
            raise DistmlError(f"must be at least 2, got {self.k}", option="--k")
        if self.model not in MODELS:
            raise DistmlError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}", option="--model")
        if self.epochs < 1:
            raise DistmlError(f"must be at least 1, got {self.epochs}", option="--epochs")
        if self.batch_size < 1:
            raise DistmlError(f"must be at least 1, got {self.batch_size}", option="--batch-size")
        _positive(self.lr, "--lr")
        self.cluster.validate()

    @property
    def train_settings(self) -> TrainSettings:
        return TrainSettings(self.model, self.epochs, self.batch_size, self.lr, self.seed)

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("out", "data_dir"):
            data[key] = None if data[key] is None else str(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> KFoldConfig:
        data = dict(data)
        data["cluster"] = ClusterConfig(**data["cluster"])
        for key in ("out", "data_dir"):
            data[key] = None if data.get(key) is None else Path(data[key])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def check_training(epochs: int, batch_size: int, lr: float) -> None:
    """The options every training command shares."""
    if epochs < 1:
        raise DistmlError(f"must be at least 1, got {epochs}", option="--epochs")
    if batch_size < 1:
        raise DistmlError(f"must be at least 1, got {batch_size}", option="--batch-size")
    _positive(lr, "--lr")


def paths_to_str(data: dict, keys=("out", "data_dir")) -> dict:
    """A config's dict with its paths as strings, for JSON and Ray."""
    return {k: (str(v) if k in keys and v is not None else v) for k, v in data.items()}
