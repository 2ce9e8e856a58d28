"""Plain torch loops that return numbers. Nothing here prints, writes files or knows about Ray."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distml.config import TrainSettings
from distml.models import StackedMLP, build_model
from distml.optim import Adam, Scheduled
from distml.scores import macro_scores

__all__ = ["TrainSettings"]  # re-exported: the loop's settings live in config.py, beside the configs that make them


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
class Divergence:
    """Where a model's training failed: the epoch (1-based) whose loss stopped being finite, that loss, the rate."""

    epoch: int
    loss: float  # nan or inf
    lr: float

    def __str__(self) -> str:
        return f"diverged at epoch {self.epoch} (loss {self.loss:g} at lr {self.lr:g})"


class Diverged(ArithmeticError):
    """`fit`'s model diverged: its state holds the epochs before. `name` (a model's, a fold's) begins the message."""

    def __init__(self, divergence: Divergence, name: str | None = None):
        super().__init__(f"{name}: {divergence}" if name else str(divergence))
        self.divergence = divergence


def _divergence(epoch: int, lr: float, train_loss: float, val: Metrics | None) -> Divergence | None:
    """The epoch's Divergence if its training loss, or else the validation loss after it, is not finite; else None.
    `val` is None when the training loss alone already says so."""
    loss = val.loss if val is not None and math.isfinite(train_loss) else train_loss
    return None if math.isfinite(loss) else Divergence(epoch, loss, lr)


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float


@dataclass
class TrainState:
    """Everything needed to carry on after an interruption, at an epoch boundary."""

    model: nn.Module
    optimizer: Adam
    generator: torch.Generator
    history: list[EpochRecord] = field(default_factory=list)
    train_seconds: float = 0.0
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # a user's; None: cross-entropy

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    def state_dict(self) -> dict:
        model = getattr(self.model, "module", self.model)  # a DDP-wrapped model's weights without DDP's prefix
        return {
            "model": model.state_dict(),
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


def lr_factors(schedule: str, epoch: int, steps_per_epoch: int, epochs: int) -> Iterator[float] | None:
    """The learning-rate multiples for each step of `epoch` (1-based): None for a constant rate, else a cosine
    decay from 1 at the first step of the run to nearly 0 at its last. Fixed by the epoch alone, so a run resumed
    at an epoch boundary takes the same steps."""
    if schedule == "constant":
        return None
    total = steps_per_epoch * epochs
    first = (epoch - 1) * steps_per_epoch
    return (0.5 * (1 + math.cos(math.pi * step / total)) for step in range(first, first + steps_per_epoch))


def _epoch_sums(
    model: nn.Module,
    batch_iter: Iterator[tuple[torch.Tensor, torch.Tensor]],
    optimizer: Adam,
    lr_factor_iter: Iterator[float] | None,
    models: int | None,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    on_batch: Callable[[int], None] | None = None,
    check_every_step: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training pass shared by one model (batches (B, ...), `models` None) and a stack of `models` models
    (batches (G, B, ...)): each model's mean training loss and accuracy over the epoch. `on_batch(steps done)` after
    every step (a progress display's; it must be cheap).

    A model whose loss stops being finite has a non-finite mean; with `check_every_step`, the epoch ends at the step
    where no model's loss is finite any more, before that step's update."""
    model.train()
    shape = () if models is None else (models,)
    loss_sum = torch.zeros(shape, dtype=torch.float64)
    correct = torch.zeros(shape, dtype=torch.int64)
    seen = steps = 0
    for xb, yb in batch_iter:
        if lr_factor_iter is not None:
            optimizer.scale_lr(next(lr_factor_iter))
        optimizer.zero_grad(set_to_none=True)
        logits = model(xb)
        if loss is not None:  # a user's loss: one model, its batch's mean
            losses = loss(logits, yb)
        else:
            losses = F.cross_entropy(logits.flatten(0, -2), yb.flatten(), reduction="none").view(yb.shape).mean(-1)
        if check_every_step and not torch.isfinite(losses.detach()).any():  # nothing left to train this epoch
            loss_sum += losses.detach().to(loss_sum.device, torch.float64)
            break
        # stacked: the sum's gradient for each model's weights is exactly the gradient of that model's own mean loss
        losses.sum().backward()
        optimizer.step()
        # accumulate as tensors: no host sync per step on a GPU
        loss_sum += losses.detach().to(loss_sum.device, torch.float64) * yb.shape[-1]
        correct += (logits.detach().argmax(-1) == yb).sum(-1).cpu()
        seen += yb.shape[-1]
        steps += 1
        if on_batch is not None:
            on_batch(steps)
    return loss_sum / max(seen, 1), correct.double() / max(seen, 1)


def train_epoch(
    model: nn.Module,
    batch_iter: Iterator[tuple[torch.Tensor, torch.Tensor]],
    optimizer: Adam,
    lr_factor_iter: Iterator[float] | None = None,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    on_batch: Callable[[int], None] | None = None,
    check_every_step: bool = False,
) -> tuple[float, float]:
    """One pass over the batches; returns (mean training loss, training accuracy).

    With `lr_factor_iter`, each step's rate is the optimizer's initial rate times the next factor. `loss`: a user's
    (logits, targets) -> mean loss; None: cross-entropy. With `check_every_step`, a non-finite loss ends the pass at
    once (the mean loss is then not finite).
    """
    mean_loss, accuracy = _epoch_sums(
        model, batch_iter, optimizer, lr_factor_iter, None, loss, on_batch, check_every_step
    )
    return float(mean_loss), float(accuracy)


@torch.no_grad()
def predict(
    model: nn.Module, x: torch.Tensor, batch_size: int = 2048, index: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits for every row of x, or for the rows in `index`, gathered a batch at a time (x is never copied whole)."""
    model.eval()
    if index is None:
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    return torch.cat([model(x.index_select(0, index[i : i + batch_size])) for i in range(0, len(index), batch_size)])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int | None = None,
    index: torch.Tensor | None = None,
) -> Metrics:
    """Metrics on (x, y), or on the rows in `index` of them; the classes are the model's outputs unless given."""
    if index is not None:
        y = y.index_select(0, index)
    return metrics_of(predict(model, x, index=index), y, num_classes)


def metrics_of(logits: torch.Tensor, y: torch.Tensor, num_classes: int | None = None) -> Metrics:
    """Metrics of a model's logits for the examples whose labels are y."""
    loss = float(F.cross_entropy(logits, y))
    predictions = logits.argmax(1)
    confusion = confusion_matrix(y, predictions, num_classes or logits.shape[-1])
    precision, recall, f1 = macro_scores(confusion)
    accuracy = float(np.trace(confusion) / max(confusion.sum(), 1))
    return Metrics(loss, accuracy, precision, recall, f1, confusion)


_SEEDING = threading.Lock()  # torch's default generator is global: trainer threads take turns to seed and use it


def new_state(
    settings: TrainSettings,
    stream: int,
    device: torch.device | str = "cpu",
    build: Callable[[], nn.Module] | None = None,
    optimizer: Callable | None = None,
    loss: Callable[[], Callable] | None = None,
) -> TrainState:
    """A fresh model, optimizer and shuffling generator, seeded by (seed, stream): folds differ, reruns agree.

    `build` makes the model (default: the built-in network `settings.model` names, for MNIST); `optimizer(params,
    lr)` a torch optimizer (default: Adam); `loss()` the (logits, targets) -> mean loss (default: cross-entropy)."""
    with _SEEDING:
        torch.manual_seed(settings.seed * 1_000_003 + stream)
        model = (build or (lambda: build_model(settings.model)))().to(device)
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + stream)
    if optimizer is None:
        chosen = Adam(model.parameters(), settings.lr)
    else:
        chosen = Scheduled(optimizer(model.parameters(), settings.lr))
    return TrainState(model, chosen, generator, loss=None if loss is None else loss())


def _step_reporter(
    on_batch: Callable[[int, int, int], None] | None, epoch: int, steps: int
) -> Callable[[int], None] | None:
    return None if on_batch is None else lambda done: on_batch(epoch, done, steps)


def _check_every_step(x: torch.Tensor, world_size: int = 1) -> bool:
    """Whether the loop reads every step's loss: on a GPU that is a sync point (the epoch's sums are read instead), and
    DDP's ranks must take the same steps (one that stopped alone would leave the others waiting in their all-reduce)."""
    return x.device.type == "cpu" and world_size == 1


def _last_epoch(settings: TrainSettings, until: int | None) -> int:
    """The epoch a call of fit stops after: `until` lets a caller take the run an epoch at a time; the rate
    schedule still spans all `settings.epochs`."""
    return settings.epochs if until is None else min(until, settings.epochs)


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
    until: int | None = None,
    on_batch: Callable[[int, int, int], None] | None = None,
) -> Metrics:
    """Train from `state.epochs_done` up to `settings.epochs` (or epoch `until`), then return the validation metrics.

    `on_epoch` is called after every epoch with the state and that epoch's record: the caller reports,
    checkpoints or prints there; `on_batch(epoch, steps done, steps per epoch)` after every step. The loop itself
    has no side effects beyond `state`. A training or validation loss that is not finite raises Diverged, `state`
    holding the epochs before (the training loss is checked every step on a CPU, every epoch on a GPU or with DDP).
    """
    per_rank_batch = max(1, settings.batch_size // world_size)
    steps_per_epoch = math.ceil(len(train_index) // world_size / per_rank_batch)
    val = None  # the last epoch's validation is the result; only a finished state resumed needs its own pass
    for epoch in range(state.epochs_done + 1, _last_epoch(settings, until) + 1):
        started = time.perf_counter()
        batch_iter = batches(x, y, train_index, per_rank_batch, state.generator, rank, world_size)
        factors = lr_factors(settings.lr_schedule, epoch, steps_per_epoch, settings.epochs)
        step_done = _step_reporter(on_batch, epoch, steps_per_epoch)
        train_loss, train_accuracy = train_epoch(
            state.model, batch_iter, state.optimizer, factors, state.loss, step_done, _check_every_step(x, world_size)
        )
        val = evaluate(state.model, x, y, index=val_index) if math.isfinite(train_loss) else None
        seconds = time.perf_counter() - started
        state.train_seconds += seconds
        divergence = _divergence(epoch, settings.lr, train_loss, val)
        if divergence is not None:
            raise Diverged(divergence)
        record = EpochRecord(epoch, train_loss, train_accuracy, val.loss, val.accuracy, seconds)
        state.history.append(record)
        if on_epoch is not None:
            on_epoch(state, record)
    return val if val is not None else evaluate(state.model, x, y, index=val_index)


@dataclass
class GroupState:
    """Several folds' MLPs trained at once as one StackedMLP, each with its own shuffling and history.

    A model that diverged stays in the stack, where its weights touch no other model's, but out of the results: its
    history stops at the epoch before, and `diverged` says where."""

    model: StackedMLP
    optimizer: Adam
    generators: list[torch.Generator]
    histories: list[list[EpochRecord]]
    train_seconds: float = 0.0
    diverged: dict[int, Divergence] = field(default_factory=dict)  # the model's position in the stack -> where

    @property
    def epochs_done(self) -> int:
        return max(len(history) for history in self.histories)  # the models still training

    def state_dict(self) -> dict:
        model = getattr(self.model, "module", self.model)  # a DDP-wrapped model's weights without DDP's prefix
        return {
            "model": model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generators": [g.get_state() for g in self.generators],
            "histories": [[asdict(r) for r in history] for history in self.histories],
            "train_seconds": self.train_seconds,
            "diverged": {g: asdict(divergence) for g, divergence in self.diverged.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for generator, saved in zip(self.generators, state["generators"], strict=True):
            generator.set_state(saved)
        self.histories = [[EpochRecord(**r) for r in history] for history in state["histories"]]
        self.train_seconds = float(state["train_seconds"])
        self.diverged = {int(g): Divergence(**saved) for g, saved in state.get("diverged", {}).items()}


def new_group_state(
    settings: TrainSettings,
    streams: list[int],
    device: torch.device | str = "cpu",
    build: Callable[[], nn.Module] | None = None,
    normalization: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> GroupState:
    """Each model starts exactly as `new_state(settings, stream, device, build)` would start it alone; with
    `normalization`, each fold's (mean, std) over its flattened input is applied in the stack before its MLP."""
    singles = [new_state(settings, stream, device, build) for stream in streams]
    stats = ()
    if normalization is not None:  # per channel or feature, spread over the flattened input the stack sees
        features = math.prod(singles[0].model.input_shape)

        def flat(values: torch.Tensor) -> torch.Tensor:
            return values.flatten().repeat_interleave(features // values.numel())

        stats = tuple(torch.stack([flat(pair[i]) for pair in normalization]).unsqueeze(1) for i in (0, 1))
    model = StackedMLP([single.model for single in singles], *stats).to(device)
    return GroupState(
        model, Adam(model.parameters(), settings.lr), [s.generator for s in singles], [[] for _ in streams]
    )


def group_batches(
    x: torch.Tensor, y: torch.Tensor, indices: list[torch.Tensor], batch_size: int, generators: list[torch.Generator]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of shape (G, B, ...): every model takes the same number of full steps per epoch.

    Each model shuffles its own indices; one with fewer images than the largest wraps around its shuffled
    order to fill its last batch (a handful of images seen twice an epoch).
    """
    steps = max(math.ceil(len(index) / batch_size) for index in indices)
    need = steps * batch_size
    orders = []
    for index, generator in zip(indices, generators, strict=True):
        order = index[torch.randperm(len(index), generator=generator).to(index.device)]
        order = order.repeat(math.ceil(need / len(order)))[:need]
        orders.append(order.view(steps, batch_size))
    for step in torch.stack(orders, dim=1):  # (steps, G, B)
        rows = step.flatten()  # index_select gathers rows faster than advanced indexing x[step] on a CPU
        yield x.index_select(0, rows).view(*step.shape, *x.shape[1:]), y.index_select(0, rows).view(step.shape)


def train_group_epoch(
    model: StackedMLP,
    batch_iter: Iterator[tuple[torch.Tensor, torch.Tensor]],
    optimizer: Adam,
    lr_factor_iter: Iterator[float] | None = None,
    on_batch: Callable[[int], None] | None = None,
    check_every_step: bool = False,
) -> tuple[list[float], list[float]]:
    """One epoch of every stacked model; returns each one's mean training loss and accuracy (see _epoch_sums for
    `check_every_step`)."""
    losses, accuracies = _epoch_sums(
        model, batch_iter, optimizer, lr_factor_iter, model.size, None, on_batch, check_every_step
    )
    return losses.tolist(), accuracies.tolist()


def fit_group(
    state: GroupState,
    settings: TrainSettings,
    x: torch.Tensor,
    y: torch.Tensor,
    train_indices: list[torch.Tensor],
    val_indices: list[torch.Tensor],
    on_epoch: Callable[[GroupState, list[EpochRecord | None]], None] | None = None,
    until: int | None = None,
    on_batch: Callable[[int, int, int], None] | None = None,
) -> list[Metrics | Divergence]:
    """`fit` for a group of models trained at once: returns each one's validation metrics, or its Divergence.

    A model whose loss stops being finite leaves the group (`state.diverged`); the others train on with exactly the
    numbers they would have had without it. `on_epoch` gets None as the record of a model that has left."""
    steps_per_epoch = max(math.ceil(len(index) / settings.batch_size) for index in train_indices)
    vals = None  # as in fit: the last epoch's validation is the result
    for epoch in range(state.epochs_done + 1, _last_epoch(settings, until) + 1):
        if len(state.diverged) == state.model.size:
            break
        started = time.perf_counter()
        batch_iter = group_batches(x, y, train_indices, settings.batch_size, state.generators)
        factors = lr_factors(settings.lr_schedule, epoch, steps_per_epoch, settings.epochs)
        step_done = _step_reporter(on_batch, epoch, steps_per_epoch)
        train_losses, train_accuracies = train_group_epoch(
            state.model, batch_iter, state.optimizer, factors, step_done, _check_every_step(x)
        )
        vals = _validate_group(state, x, y, val_indices, train_losses)
        seconds = time.perf_counter() - started
        state.train_seconds += seconds
        records: list[EpochRecord | None] = [None] * state.model.size
        for g, loss in enumerate(train_losses):
            if g in state.diverged:
                continue
            divergence = _divergence(epoch, settings.lr, loss, vals.get(g))
            if divergence is not None:
                state.diverged[g] = divergence
                continue
            records[g] = EpochRecord(epoch, loss, train_accuracies[g], vals[g].loss, vals[g].accuracy, seconds)
            state.histories[g].append(records[g])
        if on_epoch is not None:
            on_epoch(state, records)
    if vals is None:
        vals = _validate_group(state, x, y, val_indices)
    return [state.diverged[g] if g in state.diverged else vals[g] for g in range(state.model.size)]


def _validate_group(
    state: GroupState,
    x: torch.Tensor,
    y: torch.Tensor,
    val_indices: list[torch.Tensor],
    train_losses: list[float] | None = None,
) -> dict[int, Metrics]:
    """The validation metrics of each stacked model still in the group (with `train_losses`, of each whose epoch's
    loss is finite), by its position."""
    models = state.model.unstack()
    return {
        g: evaluate(models[g], x, y, index=index)
        for g, index in enumerate(val_indices)
        if g not in state.diverged and (train_losses is None or math.isfinite(train_losses[g]))
    }
