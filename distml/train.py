"""Plain torch loops that return numbers. Nothing here prints, writes files or knows about Ray."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distml.models import build_model


@dataclass(frozen=True)
class Metrics:
    """Loss, accuracy and macro-averaged precision, recall and F1, with the confusion matrix they come from."""

    loss: float
    accuracy: float
    precision: float
    recall: float
    f1: float
    confusion: np.ndarray  # rows: true class, columns: predicted class

    def scalars(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k != "confusion"}


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float


@dataclass(frozen=True)
class TrainSettings:
    """What the loop needs to know; the commands' configs hand it over."""

    model: str = "mlp"
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


@dataclass
class TrainState:
    """Everything needed to carry on after an interruption, at an epoch boundary."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    history: list[EpochRecord] = field(default_factory=list)
    train_seconds: float = 0.0

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "history": [asdict(r) for r in self.history],
            "train_seconds": self.train_seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.history = [EpochRecord(**r) for r in state["history"]]
        self.train_seconds = float(state["train_seconds"])


def confusion_matrix(targets: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> np.ndarray:
    counts = torch.bincount(targets * num_classes + predictions, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu().numpy()


def class_scores(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall and F1 from a confusion matrix (a class never predicted scores 0, as sklearn)."""
    true_positive = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, true_positive / predicted, 0.0)
        recall = np.where(actual > 0, true_positive / actual, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return precision, recall, f1


def macro_scores(confusion: np.ndarray) -> tuple[float, float, float]:
    """Macro precision, recall and F1 over the classes present."""
    precision, recall, f1 = class_scores(confusion)
    present = confusion.sum(axis=1) > 0
    return float(precision[present].mean()), float(recall[present].mean()), float(f1[present].mean())


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    indices: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled mini-batches of x[indices]; with world_size > 1, this rank's equal share of each epoch.

    Batches are gathered one at a time, so the dataset is never copied whole.
    """
    order = indices[torch.randperm(len(indices), generator=generator).to(indices.device)]
    if world_size > 1:  # every rank must take the same number of steps, or DDP waits forever
        per_rank = len(order) // world_size
        order = order[: per_rank * world_size][rank::world_size]
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        yield x.index_select(0, index), y.index_select(0, index)


def train_epoch(
    model: nn.Module, batch_iter: Iterator[tuple[torch.Tensor, torch.Tensor]], optimizer: torch.optim.Optimizer
) -> tuple[float, float]:
    """One pass over the batches; returns (mean training loss, training accuracy)."""
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    seen = 0
    for xb, yb in batch_iter:
        optimizer.zero_grad(set_to_none=True)
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        loss.backward()
        optimizer.step()
        # accumulate as tensors: no host sync per step on a GPU
        loss_sum += loss.detach().to(loss_sum.device, torch.float64) * len(yb)
        correct += (logits.detach().argmax(1) == yb).sum().cpu()
        seen += len(yb)
    return float(loss_sum) / max(seen, 1), float(correct) / max(seen, 1)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """Logits for every row of x."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int = 10) -> Metrics:
    logits = predict(model, x)
    loss = float(F.cross_entropy(logits, y))
    predictions = logits.argmax(1)
    confusion = confusion_matrix(y, predictions, num_classes)
    precision, recall, f1 = macro_scores(confusion)
    accuracy = float(np.trace(confusion) / max(confusion.sum(), 1))
    return Metrics(loss, accuracy, precision, recall, f1, confusion)


def new_state(settings: TrainSettings, stream: int, device: torch.device | str = "cpu") -> TrainState:
    """A fresh model, optimizer and shuffling generator, seeded by (seed, stream): folds differ, reruns agree."""
    torch.manual_seed(settings.seed * 1_000_003 + stream)
    model = build_model(settings.model).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + stream)
    return TrainState(model, optimizer, generator)


def fit(
    state: TrainState,
    settings: TrainSettings,
    x: torch.Tensor,
    y: torch.Tensor,
    train_index: torch.Tensor,
    val_index: torch.Tensor,
    on_epoch: Callable[[TrainState, EpochRecord], None] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Metrics:
    """Train from `state.epochs_done` up to `settings.epochs`, then return the validation metrics.

    `on_epoch` is called after every epoch with the state and that epoch's record: the caller reports,
    checkpoints or prints there. The loop itself has no side effects beyond `state`.
    """
    x_val, y_val = x.index_select(0, val_index), y.index_select(0, val_index)
    per_rank_batch = max(1, settings.batch_size // world_size)
    for epoch in range(state.epochs_done + 1, settings.epochs + 1):
        started = time.perf_counter()
        batch_iter = batches(x, y, train_index, per_rank_batch, state.generator, rank, world_size)
        train_loss, train_accuracy = train_epoch(state.model, batch_iter, state.optimizer)
        val = evaluate(state.model, x_val, y_val)
        seconds = time.perf_counter() - started
        state.train_seconds += seconds
        record = EpochRecord(epoch, train_loss, train_accuracy, val.loss, val.accuracy, seconds)
        state.history.append(record)
        if on_epoch is not None:
            on_epoch(state, record)
    return evaluate(state.model, x_val, y_val)
