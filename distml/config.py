"""Typed, validated configuration. Dicts appear only at the Ray boundary (`to_dict`/`from_dict`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from distml import storage
from distml.errors import DistmlError

# The networks models.py builds. Named here so that validating a config never imports torch: the driver of a
# distributed run does no training, and torch's import is seconds of its start-up.
MODEL_NAMES = ("mlp", "cnn")
# 32 px: on a 2-core CPU 1.6-1.8x faster to train and 3x faster to predict than 64 px, which in a short measured
# fine-tune gained accuracy (README notes): 64 px is worth it where time allows
DEFAULT_IMAGE_SIZE = 32  # ResNet18's input side: see README, "Fine-tuning ResNet18", for the trade-off


@dataclass(frozen=True)
class TrainSettings:
    """What the training loop needs to know; the commands' configs hand it over."""

    model: str = "mlp"
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


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
    folds_per_trial: int | None = 1  # None: as many as make one trial per worker (MLP only)
    out: Path | None = None
    data_dir: Path | None = None
    storage: str | None = None  # a local or mounted folder, or a cloud URI (see storage.py)
    cluster: ClusterConfig = ClusterConfig()

    def validate(self) -> None:
        if self.k < 2:
            raise DistmlError(f"must be at least 2, got {self.k}", option="--k")
        if self.model not in MODEL_NAMES:
            raise DistmlError(f"unknown model {self.model!r}; choose one of {', '.join(MODEL_NAMES)}", option="--model")
        if self.epochs < 1:
            raise DistmlError(f"must be at least 1, got {self.epochs}", option="--epochs")
        if self.batch_size < 1:
            raise DistmlError(f"must be at least 1, got {self.batch_size}", option="--batch-size")
        _positive(self.lr, "--lr")
        if self.storage is not None:
            storage.check(self.storage)
        self.cluster.validate()
        if self.folds_per_trial is not None and self.folds_per_trial < 1:
            raise DistmlError(f"must be at least 1 or 'auto', got {self.folds_per_trial}", option="--folds-per-trial")
        if self.folds_per_trial not in (None, 1) and (self.model != "mlp" or self.cluster.workers_per_fold > 1):
            raise DistmlError(
                "several folds per trial train as one stacked MLP: use it with --model mlp and --workers-per-fold 1",
                option="--folds-per-trial",
            )

    def trial_size(self, folds: int, concurrent: int) -> int:
        """Folds per trial: the option, or with 'auto' one trial per concurrent worker for the MLP."""
        if self.folds_per_trial is not None:
            return self.folds_per_trial
        if self.model != "mlp" or self.cluster.workers_per_fold > 1:
            return 1
        return max(1, math.ceil(folds / concurrent))

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
