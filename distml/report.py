"""pandas tables of a run and their statistics. Writing is atomic (see atomic.py)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.special import stdtrit  # the t quantile, without importing all of scipy.stats

from distml.scores import class_scores

FOLD_COLUMNS = [
    "fold",
    "train_size",
    "val_size",
    "val_accuracy",
    "val_loss",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "test_accuracy",  # on the run's test set, when it has one
    "test_loss",
    "epochs",
    "train_seconds",
    "node",
    "node_id",  # the Ray node, which tells apart nodes that share an IP address
    "device",
    "attempts",
]
HISTORY_COLUMNS = ["fold", "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds"]
SUMMARY_METRICS = [
    "val_accuracy",
    "val_loss",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "test_accuracy",
    "test_loss",
    "train_seconds",
]


def fold_table(rows: list[dict]) -> pd.DataFrame:
    """One row per fold, sorted by fold, in a fixed column order."""
    frame = pd.DataFrame(rows, columns=FOLD_COLUMNS)
    return frame.sort_values("fold").reset_index(drop=True)


def history_table(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
    return frame.sort_values(["fold", "epoch"]).reset_index(drop=True)


def mean_confidence_interval(values, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, sample standard deviation, CI low, CI high) with Student's t; a single value has no spread."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan, math.nan
    std = float(values.std(ddof=1))
    half = float(stdtrit(len(values) - 1, 0.5 + confidence / 2)) * std / math.sqrt(len(values))
    return mean, std, mean - half, mean + half


def summary_table(folds: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for metric in SUMMARY_METRICS:
        if folds[metric].isna().all():  # no test set
            continue
        mean, std, low, high = mean_confidence_interval(folds[metric])
        rows.append(
            {"metric": metric, "mean": mean, "std": std, "ci95_low": low, "ci95_high": high, "folds": len(folds)}
        )
    return pd.DataFrame(rows)


def format_summary(summary: pd.DataFrame) -> str:
    return summary.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def per_class_table(confusion: np.ndarray, classes: list | None = None) -> pd.DataFrame:
    """Precision, recall, F1, support and predictions of every class (rows true, columns predicted), by name."""
    precision, recall, f1 = class_scores(confusion)
    return pd.DataFrame(
        {
            "class": np.arange(len(confusion)) if classes is None else list(classes),
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": confusion.sum(axis=1),
            "predicted": confusion.sum(axis=0),
        }
    )


def markdown_table(frame: pd.DataFrame) -> str:
    """A pipe table for report.md (pandas' to_markdown needs tabulate, which distml does without)."""

    def cell(value) -> str:
        if isinstance(value, float | np.floating):
            return "" if math.isnan(value) else f"{value:.4f}"
        return str(value)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)
