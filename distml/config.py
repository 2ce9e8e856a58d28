"""Typed, validated configuration. Dicts appear only at the Ray boundary (`to_dict`/`from_dict`)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distml import storage
from distml.errors import DistmlError
from distml.search_space import parse_spec, space_params

# The networks models.py builds. Named here so that validating a config never imports torch: the driver of a
# distributed run does no training, and torch's import is seconds of its start-up.
MODEL_NAMES = ("mlp", "cnn", "resnet18")
# How the inputs are normalised, as a step of every fold's model: "auto" (MNIST's known constants for MNIST, else
# "fold"), "fold" (per channel or feature, from each fold's training part), "none", or given values "MEAN:STD" with
# one comma-separated value per channel or feature, or one for all ("0.5:0.25", "0.48,0.46,0.41:0.23,0.22,0.22")
NORMALIZE_MODES = ("auto", "fold", "none")
CALLABLE_PREFIX = "callable "  # how a config names a model given as a Python callable (it cannot be rebuilt)
# "cosine" decays the rate from --lr to zero over the run, step by step (the CNN needs it to pass 99%: README)
LR_SCHEDULES = ("constant", "cosine")
# ResNet18's input side: 32 px is the fastest that works (ResNet18 downsamples 32x); larger sides are slower and
# can gain accuracy (README, "Fine-tuning ResNet18")
DEFAULT_IMAGE_SIZE = 32


@dataclass(frozen=True)
class TrainSettings:
    """What the training loop needs to know. The configs of the commands that train a model extend it."""

    model: str = "mlp"  # a built-in name, an import string, or a callable's label (CALLABLE_PREFIX)
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    lr_schedule: str = "constant"

    @property
    def train_settings(self) -> TrainSettings:
        """These settings alone, without the command's other fields (what a trainer is handed)."""
        return TrainSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainSettings)})


def check_model_name(model: str) -> None:
    """A built-in name, an import string (`package.module:fn`, `file.py:fn`), or a callable's label; whether an import
    string really imports is checked when the model is built (models.py), before Ray starts."""
    if model in MODEL_NAMES or model.startswith(CALLABLE_PREFIX):
        return
    module, _, function = model.rpartition(":")
    if not module or not function.isidentifier():
        raise DistmlError(
            f"unknown model {model!r}; choose one of {', '.join(MODEL_NAMES)}, or give your own as "
            "package.module:function or file.py:function",
            option="--model",
        )


def parse_normalize(value: str) -> tuple[list[float], list[float]] | None:
    """The given (mean, std) values of a `--normalize MEAN:STD`, or None for a mode; one-line error otherwise."""
    if value in NORMALIZE_MODES:
        return None
    try:
        mean_text, std_text = value.split(":")
        mean = [float(v) for v in mean_text.split(",")]
        std = [float(v) for v in std_text.split(",")]
    except ValueError:
        raise DistmlError(
            f"{value!r} is not auto, fold, none or MEAN:STD (comma-separated per channel or feature)",
            option="--normalize",
        ) from None
    if len(mean) != len(std) or not all(math.isfinite(v) for v in mean) or not all(v > 0 for v in std):
        raise DistmlError(
            f"{value!r}: as many means as stds, finite, and every std positive", option="--normalize"
        ) from None
    return mean, std


@dataclass(frozen=True)
class DataOptions:
    """What data a run trains on and how its model is built for it: shared by kfold and train."""

    data: str = "mnist"  # "mnist", "imagefolder:DIR", "npz:FILE", "csv:FILE", or "in memory" (the Python API's)
    target: str | None = None  # the label column of a CSV
    x_key: str = "x"  # the arrays of an .npz
    y_key: str = "y"
    resize: str | None = None  # "HxW": an ImageFolder's images resized to one size
    normalize: str = "auto"
    test_data: str | None = None  # kept out of every fold; MNIST brings its own test images
    model_kwargs: dict = field(default_factory=dict)  # the user's keywords for the model factory
    loss: str | None = None  # the label of a Python loss factory (CALLABLE_PREFIX ...); None: cross-entropy
    optimizer: str | None = None  # the label of a Python optimizer factory; None: Adam

    @property
    def in_memory(self) -> bool:
        """Data given as Python objects (arrays, a torch Dataset): a run on them cannot be resumed from the CLI."""
        return self.data == IN_MEMORY

    def check_data_options(self) -> None:
        parse_normalize(self.normalize)
        if not isinstance(self.model_kwargs, dict) or not all(isinstance(k, str) for k in self.model_kwargs):
            raise DistmlError("must be KEY=VALUE pairs", option="--model-arg")


IN_MEMORY = "in memory"
OOF_FORMATS = ("csv", "parquet")
TRACKERS = ("mlflow", "tensorboard")


def check_track(track: str | None) -> None:
    if track is not None and track not in TRACKERS:
        raise DistmlError(f"unknown tracker {track!r}; choose one of {', '.join(TRACKERS)}", option="--track")


def parse_model_args(pairs: list[str]) -> dict:
    """`--model-arg KEY=VALUE`, repeated: the values parsed as JSON where they parse (256, 0.5, true, [64, 32]),
    otherwise kept as strings."""
    kwargs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise DistmlError(f"{pair!r} is not KEY=VALUE with KEY a Python name", option="--model-arg")
        if key in kwargs:
            raise DistmlError(f"{key} is given twice", option="--model-arg")
        try:
            kwargs[key.strip()] = json.loads(value)
        except ValueError:
            kwargs[key.strip()] = value
    return kwargs


def _positive(value: float, option: str) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise DistmlError(f"must be positive, got {value}", option=option)


def _non_negative(value: float, option: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise DistmlError(f"must be zero or more, got {value}", option=option)


PATH_FIELDS = ("out", "data_dir")


class Serialized:
    """The one serializer of every config: JSON-ready values (paths as strings, the cluster options as a dict) for
    config.json and Ray's param_space, and back. Keys a newer or older version added are ignored."""

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in PATH_FIELDS:
            if data.get(key) is not None:
                data[key] = str(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict):
        if not isinstance(data, dict):
            raise DistmlError(f"the saved options are {type(data).__name__}, not a mapping of options")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        _check_types(cls, values)
        if isinstance(values.get("cluster"), dict):
            values["cluster"] = ClusterConfig.from_dict(values["cluster"])
        for key in PATH_FIELDS:
            if values.get(key) is not None:
                values[key] = Path(values[key])
        return cls(**values)


# Options that say where a run runs, keeps its files or is tracked, not what it trains
WHERE_OPTIONS = ("cluster", "out", "data_dir", "storage", "track")


def config_hash(config: Serialized) -> str:
    """A short digest of the options that decide what a run trains (model, data, epochs, batch size, rate, seed, k,
    ...), not of WHERE_OPTIONS: a checkpoint records it, and a resume refuses one written under other options.
    Options at their default are left out, so an option a later version adds does not change an older run's digest."""
    defaults = type(config)().to_dict()
    options = {
        key: value for key, value in config.to_dict().items() if key not in WHERE_OPTIONS and value != defaults[key]
    }
    text = json.dumps(options, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# What a resumed run takes from the call that resumes it rather than from its saved options: where it runs and
# with what (a new cluster may be larger). workers_per_fold is not among them: it decides how the folds train and
# checkpoint, so it is the run's own.
RESUMABLE_CLUSTER_FIELDS = (
    "address",
    "workers",
    "cpus_per_worker",
    "gpus_per_worker",
    "max_failures",
    "lost_node_grace_s",
)


_JSON_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,), "Path": (str,)}


def _check_types(cls, values: dict) -> None:
    """Saved options (a config.json edited by hand, say) of the types their fields declare, else a one-line error
    naming the option: a wrong type would otherwise fail far away, or quietly do something else."""
    for f in dataclasses.fields(cls):
        if f.name not in values or f.name == "cluster":
            continue
        value = values[f.name]
        kinds = [kind.strip() for kind in str(f.type).split("|")]
        if value is None and "None" in kinds:
            continue
        allowed = tuple(t for kind in kinds for t in _JSON_TYPES.get(kind, (object,)))
        wrong_bool = isinstance(value, bool) and "bool" not in kinds  # JSON true is no number of epochs
        if wrong_bool or not isinstance(value, allowed):
            raise DistmlError(
                f"saved option {f.name!r} is {value!r}; it must be {' or '.join(kinds)} (was config.json edited?)"
            )


@dataclass(frozen=True)
class ClusterConfig(Serialized):
    """Where and with what resources the work runs: held by the config of every command that runs on Ray."""

    address: str | None = None  # None: start a local Ray (or use RAY_ADDRESS)
    workers: int = 2  # fold trainers at once
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # None: one GPU per worker when the cluster has GPUs
    workers_per_fold: int = 1  # > 1: a Ray Train TorchTrainer of that many DDP workers per fold
    max_failures: int = 2
    # a run whose cluster can no longer hold one trainer (it lost nodes) waits this long for them, then ends
    lost_node_grace_s: float = 60.0
    # a fold trainer (one worker per fold) silent for this long is killed and its folds retried (None: never)
    stall_timeout_s: float | None = None

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
        if self.stall_timeout_s is not None:
            _positive(self.stall_timeout_s, "--stall-timeout")
            if self.workers_per_fold > 1:
                raise DistmlError(
                    "watches trainers of one worker per fold; drop it or use --workers-per-fold 1",
                    option="--stall-timeout",
                )

    def with_overrides(self, **given) -> ClusterConfig:
        """A resumed run's cluster: these (saved) options, with those `given` by the resuming call replacing them.

        The address is never the saved one, which may name a cluster that is gone (a job's old head): it is the
        given one, else None (RAY_ADDRESS, else a local Ray).
        """
        fixed = sorted(set(given) - set(RESUMABLE_CLUSTER_FIELDS))
        if fixed:
            raise DistmlError(f"{', '.join(fixed)} cannot be changed when resuming", option="--resume")
        return dataclasses.replace(self, **{"address": None, **given})


@dataclass(frozen=True)
class KFoldConfig(Serialized, DataOptions, TrainSettings):
    k: int = 5
    repeats: int = 1  # R x k folds: RepeatedStratifiedKFold's
    groups: str | None = None  # a file of one group label per example, or a CSV column: every group in one fold
    fold_file: str | None = None  # the user's own assignment: one fold index per example
    keep_fold_models: bool = False  # export every fold's model and their ensemble
    oof_format: str = "csv"  # out-of-fold predictions as "csv" or "parquet"
    track: str | None = None  # an experiment tracker the run is recorded in: "mlflow" or "tensorboard"
    folds_per_trial: int | None = None  # None (auto): the folds shared out evenly, a group per worker (MLP only)
    limit: int | None = None  # a stratified subset of the examples, drawn with the seed (so a resume draws it again)
    out: Path | None = None
    data_dir: Path | None = None
    storage: str | None = None  # a local or mounted folder, or a cloud URI (see storage.py)
    cluster: ClusterConfig = ClusterConfig()

    def validate(self) -> None:
        if self.k < 2:
            raise DistmlError(f"must be at least 2, got {self.k}", option="--k")
        if self.repeats < 1:
            raise DistmlError(f"must be at least 1, got {self.repeats}", option="--repeats")
        if self.fold_file is not None and (self.repeats > 1 or self.groups is not None):
            raise DistmlError("a folds file is the whole assignment: drop --repeats and --groups", option="--folds")
        check_limit(self.limit)
        if self.limit is not None and (self.fold_file is not None or self.groups is not None):
            # both give a value per example of the whole data, not of a subset
            raise DistmlError("a subset cannot keep a --folds or --groups assignment: drop one", option="--limit")
        check_track(self.track)
        if self.oof_format not in OOF_FORMATS:
            raise DistmlError(
                f"unknown format {self.oof_format!r}; choose one of {', '.join(OOF_FORMATS)}", option="--oof-format"
            )
        check_model_name(self.model)
        self.check_data_options()
        check_training(self.epochs, self.batch_size, self.lr, self.lr_schedule)
        check_seed(self.seed)
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

    @property
    def splits(self) -> int:
        """Folds over all repeats: each trains one model."""
        return self.k * self.repeats

    def trial_size(self, folds: int, concurrent: int) -> int:
        """Folds per trial: the option, or with 'auto' one trial per concurrent worker for the MLP."""
        if self.folds_per_trial is not None:
            return self.folds_per_trial
        if self.model != "mlp" or self.cluster.workers_per_fold > 1:
            return 1
        return max(1, math.ceil(folds / concurrent))


SEED_RANGE = 2**32  # numpy's RandomState, which draws the folds, takes seeds 0..2**32 - 1


def check_seed(seed: int) -> None:
    if not 0 <= seed < SEED_RANGE:
        raise DistmlError(f"must be between 0 and {SEED_RANGE - 1}, got {seed}", option="--seed")


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


def check_image_size(image_size: int) -> None:
    # ResNet18 downsamples 32x; below 32 pixels its last stage sees less than one pixel
    if not 32 <= image_size <= 512:
        raise DistmlError(f"must be between 32 and 512 pixels, got {image_size}", option="--image-size")


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise DistmlError(f"must be between 0 and 1 (exclusive), got {val_fraction}", option="--val-fraction")


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise DistmlError(f"must be at least 1, got {limit}", option="--limit")


@dataclass(frozen=True)
class HoldoutConfig(Serialized, DataOptions, TrainSettings):
    """`distml train`: one model, a stratified validation holdout, then the test set."""

    val_fraction: float = 0.1
    limit: int | None = None  # a stratified subset of the training images, for quick runs
    out: Path | None = None
    data_dir: Path | None = None
    track: str | None = None  # an experiment tracker the run is recorded in: "mlflow" or "tensorboard"

    def validate(self) -> None:
        check_track(self.track)
        check_model_name(self.model)
        self.check_data_options()
        check_training(self.epochs, self.batch_size, self.lr, self.lr_schedule)
        check_seed(self.seed)
        check_val_fraction(self.val_fraction)
        check_limit(self.limit)


@dataclass(frozen=True)
class FinetuneConfig(Serialized):
    """`distml finetune`: ResNet18 with a new head, trained by `cluster.workers` DDP workers."""

    weights: str = "imagenet"  # "imagenet", "none" or the path of a state dict
    image_size: int = DEFAULT_IMAGE_SIZE
    freeze_backbone: bool = False
    epochs: int = 1
    batch_size: int = 64  # across all workers
    lr: float = 1e-3  # the head's
    backbone_lr: float = 1e-4  # lower: the pretrained features should move less than the new head
    seed: int = 0
    val_fraction: float = 0.1
    limit: int | None = None  # a stratified subset of the training images, for quick runs
    out: Path | None = None
    data_dir: Path | None = None
    storage: str | None = None  # a local or mounted folder, or a cloud URI (see storage.py)
    cluster: ClusterConfig = ClusterConfig()
    track: str | None = None  # an experiment tracker the run is recorded in: "mlflow" or "tensorboard"

    def validate(self) -> None:
        check_track(self.track)
        check_image_size(self.image_size)
        check_training(self.epochs, self.batch_size, self.lr)
        check_seed(self.seed)
        check_limit(self.limit)
        _positive(self.backbone_lr, "--backbone-lr")
        check_val_fraction(self.val_fraction)
        if self.storage is not None:
            storage.check(self.storage)
        self.cluster.validate()
        if self.batch_size < self.cluster.workers:
            raise DistmlError(
                f"{self.batch_size} is smaller than --workers {self.cluster.workers}", option="--batch-size"
            )
        if self.cluster.workers_per_fold != 1:
            raise DistmlError("a fine-tune's workers are its DDP workers: use --workers", option="--workers-per-fold")

    @property
    def name(self) -> str:
        return "resnet18-head" if self.freeze_backbone else "resnet18-full"

    @property
    def train_settings(self) -> TrainSettings:
        return TrainSettings("resnet18", self.epochs, self.batch_size, self.lr, self.seed)


SWEEP_METRICS = {"val_accuracy": "max", "val_loss": "min"}


@dataclass(frozen=True)
class SweepConfig(Serialized):
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
    # each rate scored by its mean over the K folds of the training images (one head per fold, on the cached
    # features) instead of on the holdout; None: the holdout
    cv: int | None = None
    then_finetune: bool = False
    seed: int = 0
    out: Path | None = None
    data_dir: Path | None = None
    storage: str | None = None  # a local or mounted folder, or a cloud URI (see storage.py)
    cluster: ClusterConfig = ClusterConfig()
    track: str | None = None  # an experiment tracker the run is recorded in: "mlflow" or "tensorboard"

    @property
    def mode(self) -> str:
        return SWEEP_METRICS[self.metric]

    @property
    def cached_features(self) -> bool:
        return self.freeze_backbone and not self.uncached

    def train_settings(self, lr: float) -> TrainSettings:
        return TrainSettings("resnet18", self.epochs, self.batch_size, lr, self.seed)

    def validate(self) -> None:
        for value, option in ((self.lr_min, "--lr-min"), (self.lr_max, "--lr-max")):
            _positive(value, option)
        check_seed(self.seed)
        check_track(self.track)
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
        check_val_fraction(self.val_fraction)
        if self.train_images is not None and self.train_images < 100:
            raise DistmlError(f"must be at least 100, got {self.train_images}", option="--train-images")
        if self.uncached and not self.freeze_backbone:
            raise DistmlError("only applies with a frozen backbone", option="--uncached")
        if self.cv is not None:
            if self.cv < 2:
                raise DistmlError(f"must be at least 2, got {self.cv}", option="--cv")
            if not self.cached_features:
                given = "--no-freeze-backbone" if not self.freeze_backbone else "--uncached"
                raise DistmlError(
                    f"scores the head on the cached features of a frozen backbone: not with {given}", option="--cv"
                )
        if self.cluster.workers_per_fold != 1:
            raise DistmlError("a sweep trial trains in one process", option="--workers-per-fold")
        if self.storage is not None:
            storage.check(self.storage)
        self.cluster.validate()


@dataclass(frozen=True)
class PipelineConfig(Serialized):
    """`distml pipeline`: the options that pass through to its stages (holdout MLP, K-fold MLP, fine-tune)."""

    epochs: int = 3  # MLP holdout training and each K-fold fold
    k: int = 5
    finetune_epochs: int = 1
    batch_size: int = 64  # every stage
    weights: str = "imagenet"
    image_size: int = DEFAULT_IMAGE_SIZE
    freeze_backbone: bool = False
    limit: int | None = None  # every stage: the same stratified subset of the training images (the same seed)
    seed: int = 0
    data_dir: Path | None = None
    out: Path | None = None
    storage: str | None = None
    cluster: ClusterConfig = ClusterConfig()  # K-fold's trainers, and the fine-tune's DDP workers

    def validate(self) -> None:
        """What only the pipeline names (--finetune-epochs is its fine-tune's --epochs) and its --storage; each
        stage's config checks the options passed on to it (pipeline.check_stages)."""
        if self.finetune_epochs < 1:
            raise DistmlError(f"must be at least 1, got {self.finetune_epochs}", option="--finetune-epochs")
        if self.storage is not None:
            storage.check(self.storage)


TUNE_SEARCHES = ("random", "optuna")
TUNE_SCHEDULERS = ("none", "asha")


@dataclass(frozen=True)
class TuneConfig(Serialized, DataOptions, TrainSettings):
    """`distml tune`: a Ray Tune search whose every trial is a whole K-fold run of one configuration, scored on the
    cross-fold mean of `metric`; ASHA stops poor trials on that mean. `params`: {name: "DIST:ARGS"} (search_space.py);
    lr, batch_size, epochs and weight_decay set the training, every other name is a keyword of the model factory."""

    params: dict = field(default_factory=dict)
    trials: int = 8
    k: int = 5
    metric: str = "val_accuracy"
    search: str = "random"
    scheduler: str = "asha"
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: float = 2.0
    limit: int | None = None  # a stratified subset of the examples, drawn with the seed (so a resume draws it again)
    then_train: bool = False  # train the best configuration on the data afterwards and export it, as `train` does
    outer_k: int | None = None  # nested CV: the whole search on the training part of each of outer_k outer folds
    out: Path | None = None
    data_dir: Path | None = None
    storage: str | None = None
    cluster: ClusterConfig = ClusterConfig()
    track: str | None = None

    @property
    def mode(self) -> str:
        return SWEEP_METRICS[self.metric]

    @property
    def max_epochs(self) -> int:
        """The most epochs a trial may run (ASHA's max_t): --epochs, or the largest a searched `epochs` may take."""

        if "epochs" not in self.params:
            return self.epochs
        return int(max(parse_spec("epochs", self.params["epochs"]).candidates()))

    def validate(self) -> None:

        space_params(self.params)
        if self.trials < 1:
            raise DistmlError(f"must be at least 1, got {self.trials}", option="--trials")
        if self.k < 2:
            raise DistmlError(f"must be at least 2, got {self.k}", option="--k")
        if self.metric not in SWEEP_METRICS:
            raise DistmlError(
                f"unknown metric {self.metric!r}; choose one of {', '.join(SWEEP_METRICS)}", option="--metric"
            )
        if self.search not in TUNE_SEARCHES:
            raise DistmlError(
                f"unknown search {self.search!r}; choose one of {', '.join(TUNE_SEARCHES)}", option="--search"
            )
        if self.search == "optuna" and importlib.util.find_spec("optuna") is None:
            raise DistmlError("optuna is not installed: pip install 'distml[optuna]'", option="--search")
        if self.scheduler not in TUNE_SCHEDULERS:
            raise DistmlError(
                f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(TUNE_SCHEDULERS)}",
                option="--scheduler",
            )
        check_training(self.epochs, self.batch_size, self.lr, self.lr_schedule)
        if not 1 <= self.grace_period <= self.max_epochs:
            raise DistmlError(
                f"must be between 1 and --epochs ({self.max_epochs}), got {self.grace_period}", option="--grace-period"
            )
        if not (math.isfinite(self.reduction_factor) and self.reduction_factor > 1):
            raise DistmlError(f"must be above 1, got {self.reduction_factor}", option="--reduction-factor")
        check_model_name(self.model)
        self.check_data_options()
        check_seed(self.seed)
        check_limit(self.limit)
        check_track(self.track)
        if self.storage is not None:
            storage.check(self.storage)
        self.cluster.validate()
        if self.cluster.workers_per_fold != 1:
            raise DistmlError("a tuning trial trains its folds in one process", option="--workers-per-fold")
        if self.outer_k is not None and self.outer_k < 2:
            raise DistmlError(f"must be at least 2, got {self.outer_k}", option="--outer-k")
        if self.outer_k is not None and self.then_train:
            raise DistmlError(
                "a nested run estimates how well the search does, it trains no final model: drop one",
                option="--then-train",
            )
