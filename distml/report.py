"""pandas tables of a run and their statistics. Writing is atomic (see atomic.py)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from distml.scores import class_scores
from distml.stats import corrected_interval, t_interval

FOLD_COLUMNS = [
    "repeat",
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
HISTORY_COLUMNS = ["repeat", "fold", "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds"]
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
    return frame.sort_values(["repeat", "fold"]).reset_index(drop=True)


def history_table(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
    return frame.sort_values(["repeat", "fold", "epoch"]).reset_index(drop=True)


def summary_table(folds: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and two 95% intervals of each metric over the folds: Student's t (`ci95_*`), and the corrected
    resampled t of Nadeau & Bengio (`corrected_ci95_*`), which widens it for the overlap of the folds' training
    sets (with the mean training and validation sizes); seconds are no score, and get no corrected interval."""
    rows = []
    n_train, n_val = folds["train_size"].mean(), folds["val_size"].mean()
    for metric in SUMMARY_METRICS:
        if folds[metric].isna().all():  # no test set
            continue
        values = folds[metric].astype(float)
        mean, std, low, high = t_interval(values)
        corrected = (
            corrected_interval(values, n_train, n_val) if metric != "train_seconds" else (mean, math.nan, math.nan)
        )
        rows.append(
            {
                "metric": metric,
                "mean": mean,
                "std": std,
                "ci95_low": low,
                "ci95_high": high,
                "corrected_ci95_low": corrected[1],
                "corrected_ci95_high": corrected[2],
                "folds": len(folds),
            }
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
