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
# "cosine" decays the rate from --lr to zero over the run, step by step (the CNN needs it to pass 99%: README)
LR_SCHEDULES = ("constant", "cosine")
# 32 px: on a 2-core CPU 1.6-1.8x faster to train and 3x faster to predict than 64 px, which in a short measured
# fine-tune gained accuracy (README notes): 64 px is worth it where time allows
DEFAULT_IMAGE_SIZE = 32  # ResNet18's input side: see README, "Fine-tuning ResNet18", for the trade-off


@dataclass(frozen=True)
class TrainSettings:
    """What the training loop needs to know. The configs of the commands that train MNIST models extend it."""

    model: str = "mlp"
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    lr_schedule: str = "constant"

    @property
    def train_settings(self) -> TrainSettings:
        """These settings alone, without the command's other fields (what a trainer is handed)."""
        return TrainSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainSettings)})


def _positive(value: float, option: str) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise DistmlError(f"must be positive, got {value}", option=option)


def _non_negative(value: float, option: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise DistmlError(f"must be zero or more, got {value}", option=option)


def _to_dict(config) -> dict:
    """A config as JSON-ready values (paths as strings), for config.json and Ray's param_space."""
    data = asdict(config)
    for key in ("out", "data_dir"):
        data[key] = None if data[key] is None else str(data[key])
    return data


def _from_dict(cls, data: dict):
    """The inverse of _to_dict; keys a newer or older version added are ignored."""
    data = dict(data)
    data["cluster"] = ClusterConfig(**data["cluster"])
    for key in ("out", "data_dir"):
        data[key] = None if data.get(key) is None else Path(data[key])
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class ClusterConfig:
    """Where and with what resources the work runs."""

    address: str | None = None  # None: start a local Ray (or use RAY_ADDRESS)
    workers: int = 2  # fold trainers at once
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # None: one GPU per worker when the cluster has GPUs
    workers_per_fold: int = 1  # > 1: a Ray Train TorchTrainer of that many DDP workers per fold
    max_failures: int = 2
    # a run whose cluster can no longer hold one trainer (it lost nodes) waits this long for them, then ends
    lost_node_grace_s: float = 60.0

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
        _non_negative(self.lost_node_grace_s, "--lost-node-grace")


@dataclass(frozen=True)
class KFoldConfig(TrainSettings):
    k: int = 5
    folds_per_trial: int | None = None  # None (auto): the folds shared out evenly, a group per worker (MLP only)
    out: Path | None = None
    data_dir: Path | None = None
    storage: str | None = None  # a local or mounted folder, or a cloud URI (see storage.py)
    cluster: ClusterConfig = ClusterConfig()

    def validate(self) -> None:
        if self.k < 2:
            raise DistmlError(f"must be at least 2, got {self.k}", option="--k")
        if self.model not in MODEL_NAMES:
            raise DistmlError(f"unknown model {self.model!r}; choose one of {', '.join(MODEL_NAMES)}", option="--model")
        check_training(self.epochs, self.batch_size, self.lr, self.lr_schedule)
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

    def to_dict(self) -> dict:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> KFoldConfig:
        return _from_dict(cls, data)


def check_training(epochs: int, batch_size: int, lr: float, lr_schedule: str = "constant") -> None:
    """The options every training command shares."""
    if epochs < 1:
        raise DistmlError(f"must be at least 1, got {epochs}", option="--epochs")
    if batch_size < 1:
        raise DistmlError(f"must be at least 1, got {batch_size}", option="--batch-size")
    _positive(lr, "--lr")
    if lr_schedule not in LR_SCHEDULES:
        raise DistmlError(
            f"unknown schedule {lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}", option="--lr-schedule"
        )


def paths_to_str(data: dict, keys=("out", "data_dir")) -> dict:
    """A config's dict with its paths as strings, for JSON and Ray."""
    return {k: (str(v) if k in keys and v is not None else v) for k, v in data.items()}


SWEEP_METRICS = {"val_accuracy": "max", "val_loss": "min"}


@dataclass(frozen=True)
class SweepConfig:
    """A Ray Tune search over the ResNet18 head's learning rate, with ASHA stopping poor trials early."""

    lr_min: float = 1e-4
    lr_max: float = 1e-1
    trials: int = 8
    metric: str = "val_accuracy"
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: float = 2.0  # ASHA keeps the best 1/reduction_factor of the trials at each rung
    epochs: int = 5
    batch_size: int = 128
    freeze_backbone: bool = True
    backbone_lr: float = 1e-4  # with an unfrozen backbone; the head's rate is the one searched
    weights: str = "imagenet"  # "imagenet", "none" or a path to a state dict
    image_size: int = 32
    val_fraction: float = 0.1
    train_images: int | None = None  # a stratified subset of the training set, for quick runs
    uncached: bool = False  # frozen backbone re-run in every trial (the benchmark's baseline)
    then_finetune: bool = False
    seed: int = 0
    out: Path | None = None
    data_dir: Path | None = None
    cluster: ClusterConfig = ClusterConfig()

    @property
    def mode(self) -> str:
        return SWEEP_METRICS[self.metric]

    @property
    def cached_features(self) -> bool:
        return self.freeze_backbone and not self.uncached

    def train_settings(self, lr: float) -> TrainSettings:
        return TrainSettings("resnet18", self.epochs, self.batch_size, lr, self.seed)

    def validate(self) -> None:
        from distml.resnet import check_image_size

        for value, option in ((self.lr_min, "--lr-min"), (self.lr_max, "--lr-max")):
            _positive(value, option)
        if self.lr_min >= self.lr_max:
            raise DistmlError(f"must be below --lr-max ({self.lr_max:g}), got {self.lr_min:g}", option="--lr-min")
        if self.trials < 1:
            raise DistmlError(f"must be at least 1, got {self.trials}", option="--trials")
        if self.metric not in SWEEP_METRICS:
            raise DistmlError(
                f"unknown metric {self.metric!r}; choose one of {', '.join(SWEEP_METRICS)}", option="--metric"
            )
        if self.epochs < 1:
            raise DistmlError(f"must be at least 1, got {self.epochs}", option="--epochs")
        if not 1 <= self.grace_period <= self.epochs:
            raise DistmlError(
                f"must be between 1 and --epochs ({self.epochs}), got {self.grace_period}", option="--grace-period"
            )
        if not (math.isfinite(self.reduction_factor) and self.reduction_factor > 1):
            raise DistmlError(f"must be above 1, got {self.reduction_factor}", option="--reduction-factor")
        if self.batch_size < 1:
            raise DistmlError(f"must be at least 1, got {self.batch_size}", option="--batch-size")
        _positive(self.backbone_lr, "--backbone-lr")
        check_image_size(self.image_size)
        if not 0 < self.val_fraction < 1:
            raise DistmlError(f"must be between 0 and 1, got {self.val_fraction}", option="--val-fraction")
        if self.train_images is not None and self.train_images < 100:
            raise DistmlError(f"must be at least 100, got {self.train_images}", option="--train-images")
        if self.uncached and not self.freeze_backbone:
            raise DistmlError("only applies with a frozen backbone", option="--uncached")
        if self.cluster.workers_per_fold != 1:
            raise DistmlError("a sweep trial trains in one process", option="--workers-per-fold")
        self.cluster.validate()

    def to_dict(self) -> dict:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SweepConfig:
        return _from_dict(cls, data)
