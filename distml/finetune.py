"""`distml finetune`: ResNet18 with a new 10-class head, fine-tuned on MNIST by a Ray Train TorchTrainer.

The driver builds the starting weights (so a bad --weights fails before Ray starts) and puts them and the data
in the object store; `distributed.finetune_worker` trains with DDP; the driver then tests and exports the model
from the last checkpoint. Ray stays in distributed.py.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from distml import checkpoints
from distml.config import check_training, paths_to_str
from distml.errors import DistmlError
from distml.evaluation import RESULTS_FILE, read_trained_model, record_trained_model
from distml.export import metadata
from distml.folds import check_val_fraction
from distml.holdout import TrainOutcome, epoch_line, holdout_split, start_run
from distml.kfold import default_out
from distml.optim import Adam
from distml.resnet import DEFAULT_IMAGE_SIZE, build_resnet18, check_image_size, head_and_backbone
from distml.rundir import FINETUNE_RUN, RunDir
from distml.train import EpochRecord, TrainSettings, TrainState


@dataclass(frozen=True)
class FinetuneConfig:
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
    workers: int = 2  # DDP workers
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # None: one per worker when the cluster has GPUs
    max_failures: int = 2
    address: str | None = None
    out: Path | None = None
    data_dir: Path | None = None

    def validate(self) -> None:
        check_image_size(self.image_size)
        check_training(self.epochs, self.batch_size, self.lr)
        if not self.backbone_lr > 0:
            raise DistmlError(f"must be positive, got {self.backbone_lr}", option="--backbone-lr")
        check_val_fraction(self.val_fraction)
        if self.workers < 1:
            raise DistmlError(f"must be at least 1, got {self.workers}", option="--workers")
        if self.batch_size < self.workers:
            raise DistmlError(f"{self.batch_size} is smaller than --workers {self.workers}", option="--batch-size")
        if not self.cpus_per_worker > 0:
            raise DistmlError(f"must be positive, got {self.cpus_per_worker}", option="--cpus-per-worker")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise DistmlError(f"must be zero or more, got {self.gpus_per_worker}", option="--gpus-per-worker")
        if self.max_failures < 0:
            raise DistmlError(f"must be zero or more, got {self.max_failures}", option="--max-failures")

    @property
    def name(self) -> str:
        return "resnet18-head" if self.freeze_backbone else "resnet18-full"

    @property
    def train_settings(self) -> TrainSettings:
        return TrainSettings("resnet18", self.epochs, self.batch_size, self.lr, self.seed)

    def to_dict(self) -> dict:
        return paths_to_str(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> FinetuneConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("out", "data_dir"):
            values[key] = None if values.get(key) is None else Path(values[key])
        return cls(**values)


def finetune_state(config: FinetuneConfig, weights: dict[str, torch.Tensor], device: torch.device) -> TrainState:
    """The network from the starting weights, and Adam with one learning rate for the head, one for the backbone.

    With a frozen backbone only the head has gradients; its batch-norm statistics still adapt to MNIST.
    """
    torch.manual_seed(config.seed)
    model = build_resnet18("none", image_size=config.image_size)
    model.load_state_dict(weights)
    model.to(device)
    head, backbone = head_and_backbone(model)
    groups = [{"params": head, "lr": config.lr}]
    if config.freeze_backbone:
        for parameter in backbone:
            parameter.requires_grad_(False)
    else:
        groups.append({"params": backbone, "lr": config.backbone_lr})
    optimizer = Adam(groups)
    return TrainState(model, optimizer, torch.Generator().manual_seed(config.seed))


def run_finetune(
    config: FinetuneConfig, say: Callable[[str], None] = lambda message: None, resume: Path | None = None
) -> TrainOutcome:
    """Fine-tune ResNet18 on Ray Train, then evaluate it on the test set, save and export it.

    With `resume`, the options come from that folder's config.json and training carries on from the last epoch
    checkpoint in its Ray storage; a finished run is left as it is.
    """
    from distml import distributed  # ray is imported only when a run really starts
    from distml.data import load_mnist

    started = time.perf_counter()
    if resume is not None:
        run, config, saved = RunDir.resumed(resume, "finetune", FinetuneConfig)
        if (run.path / RESULTS_FILE).is_file():
            say(f"{run.path}: the fine-tune already finished; nothing to do")
            results, history = read_trained_model(run.path)
            return TrainOutcome(run.path, results, history, time.perf_counter() - started)
    config.validate()
    if resume is None:
        run = RunDir.fresh(config.out or default_out("finetune"), option="--out")
    start_model = build_resnet18(config.weights, image_size=config.image_size)  # a bad --weights fails here
    dataset = load_mnist(config.data_dir)
    say(f"data: {dataset.description}")
    split = holdout_split(dataset, config.val_fraction, config.limit, config.seed)
    with run.lock():  # before Ray starts: a second run on this folder is refused at once
        if resume is not None:
            if saved.get("dataset") != dataset.summary():
                raise DistmlError(f"{run.path}: the data are no longer those the run started with", option="--resume")
            point = checkpoints.train_resume_point(run.storage / FINETUNE_RUN)
            for note in point.skipped:
                say(note)
            used = point.checkpoint.name if point.checkpoint is not None else "none yet: from the first epoch"
        started_ray = distributed.connect(config.address, quiet=True)
        try:
            gpus = distributed.check_room(config.workers, config.cpus_per_worker, config.gpus_per_worker)
            if resume is None:
                start_run(run, "finetune", asdict(config), dataset)
            else:
                say(f"resuming {run.path} with its saved options, from its last epoch checkpoint ({used})")
            say(
                f"fine-tuning ResNet18 ({'head only' if config.freeze_backbone else 'head and backbone'}, "
                f"{config.image_size}x{config.image_size}, weights {config.weights}) on {split.train_size:,} images, "
                f"validating on {split.val_size:,}: {config.workers} DDP worker(s) on Ray Train"
            )
            data = distributed.SharedData(split.images, split.labels, split.assignment)
            try:
                final = distributed.run_finetune(
                    config,
                    gpus,
                    data,
                    start_model.state_dict(),
                    run.storage,
                    on_epoch=lambda record: say(epoch_line(config.name, record, config.epochs)),
                    say=say,
                )
            except DistmlError as exc:
                raise DistmlError(
                    f"{exc}; carry on from the last epoch checkpoint with `distml finetune --resume {run.path}`"
                ) from None
        finally:
            if started_ray:
                distributed.shutdown()
        model = build_resnet18("none", image_size=config.image_size)
        model.load_state_dict(final["model"])
        history = [EpochRecord(**record) for record in final["history"]]
        say("evaluating on the test set and exporting the model")
        info = metadata(
            "resnet18",
            model,
            image_size=config.image_size,
            trained_with="distml finetune",
            weights=str(config.weights),
            freeze_backbone=config.freeze_backbone,
            data=dataset.source,
        )
        results = record_trained_model(
            run.path,
            config.name,
            model,
            info,
            history,
            float(final["train_seconds"]),
            split.train_size,
            dataset,
            attempts=int(final["attempts"]),
        )
    return TrainOutcome(run.path, results, history, time.perf_counter() - started)
