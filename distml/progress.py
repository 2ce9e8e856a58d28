"""Progress messages: every distml module logs to a child of the `distml` logger; the CLI installs the handler that
prints them (`distml.cli`), and a Python caller can attach its own. The epoch line is written here, once."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

logger = logging.getLogger("distml")


def epoch_line(name: str, record, epochs: int) -> str:
    """'NAME: epoch 2/3 train_loss=0.1234 val_loss=0.2345 val_acc=0.9345 (1.2 s)' from an EpochRecord or its dict."""
    r = record if isinstance(record, dict) else dataclasses.asdict(record)
    return (
        f"{name}: epoch {r['epoch']}/{epochs} train_loss={r['train_loss']:.4f} val_loss={r['val_loss']:.4f} "
        f"val_acc={r['val_accuracy']:.4f} ({r['seconds']:.1f} s)"
    )


# ---- events: what a run reports as it goes, attached to its log records as `record.event` ----
# The CLI's handlers print them as lines or draw them as a live display; a tracker (MLflow, TensorBoard) records
# them; a Python caller may attach its own handler to the `distml` logger and read `record.event`.


@dataclass(frozen=True)
class RunStarted:
    command: str  # "kfold"
    run_dir: str
    units: list[str]  # the folds (or trials) this session trains, by name ("fold 3", "repeat 1 fold 0")
    total: int  # all of the run's folds (or trials), finished ones included
    epochs: int
    options: dict  # the run's config, as config.json holds it
    dataset: dict  # config.json's dataset summary
    resumed: bool


@dataclass(frozen=True)
class EpochEnded:
    unit: str
    index: int  # the fold's (split's) number in the run
    epoch: int  # 1-based
    epochs: int
    record: dict  # train_loss, train_accuracy, val_loss, val_accuracy, seconds; a tune trial's also FOLDS_KEY


@dataclass(frozen=True)
class BatchProgress:
    unit: str
    index: int
    epoch: int
    batch: int  # batches done in this epoch
    batches: int


@dataclass(frozen=True)
class UnitEnded:
    unit: str
    index: int
    result: dict  # the fold's result: sizes, scores, seconds, node, device, attempts


@dataclass(frozen=True)
class UnitRetried:
    units: list[str]
    indices: list[int]
    attempt: int  # the failure's number
    error: str


@dataclass(frozen=True)
class RunEnded:
    command: str
    run_dir: str
    status: str  # "finished", "failed" (some fold failed for good) or "interrupted"
    summary: list[dict]  # summary.csv's rows: metric, mean, std, ci95_*, corrected_ci95_*
    files: list[str]  # the report's files


EPOCH_SCORES = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds")
FOLDS_KEY = "folds_json"  # a `distml tune` trial's epoch: its folds' own rows (JSON), which a tracker records per fold


def publish_epoch(log: logging.Logger, unit: str, index: int, record, epochs: int, label: str | None = None) -> None:
    """An epoch's line (named `label`, default `unit`) and its EpochEnded event, from an EpochRecord or its dict
    (whose FOLDS_KEY, if any, goes with the event)."""
    scores = record if isinstance(record, dict) else dataclasses.asdict(record)
    kept = {key: float(scores[key]) for key in EPOCH_SCORES}
    if FOLDS_KEY in scores:
        kept[FOLDS_KEY] = scores[FOLDS_KEY]
    event = EpochEnded(unit, index, int(scores["epoch"]), epochs, kept)
    publish(log, epoch_line(label or unit, scores, epochs), event)


def run_files(run_dir) -> list[str]:
    """The files a finished run leaves in its folder (RunEnded.files), hidden ones (locks) left out."""
    from pathlib import Path

    return sorted(str(path) for path in Path(run_dir).iterdir() if path.is_file() and not path.name.startswith("."))


def score_rows(scores: dict) -> list[dict]:
    """A one-model run's scores as RunEnded.summary rows (metric and mean)."""
    return [
        {"metric": name, "mean": float(value)}
        for name, value in scores.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]


def wants_batches() -> bool:
    """Whether a handler of the `distml` logger draws progress within epochs (a live display): only then do trainers
    send it, a few times a second."""
    return any(getattr(handler, "wants_batches", False) for handler in logger.handlers)


def publish(log: logging.Logger, message: str, event) -> None:
    """Log `message` (the line a terminal without a live display prints) with `event` attached."""
    log.info(message, extra={"event": event})
