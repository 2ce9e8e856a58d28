"""Test-set evaluation of a trained model, and the files every trained model leaves in its run folder."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from distml import report
from distml.atomic import write_csv, write_json
from distml.export import save_model
from distml.rundir import CONFUSION_FILE, HISTORY_FILE, MODEL_DIR, PER_CLASS_FILE, RESULTS_FILE, TEST_METRICS_FILE
from distml.train import EpochRecord, Metrics, evaluate


@dataclass(frozen=True)
class TestEvaluation:
    metrics: Metrics
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def evaluate_test(model: nn.Module, inputs: np.ndarray, labels: np.ndarray) -> TestEvaluation:
    """Accuracy, macro scores and confusion matrix on held-out examples (model-ready inputs), timed."""
    started = time.perf_counter()
    metrics = evaluate(model.cpu(), torch.from_numpy(inputs), torch.from_numpy(labels))
    return TestEvaluation(metrics, len(labels), time.perf_counter() - started)


def write_test_report(
    folder: Path, evaluation: TestEvaluation, title: str, classes: list | None = None
) -> pd.DataFrame:
    """test_metrics.json, per_class.csv, confusion_matrix.csv and .png; returns the per-class table."""
    from distml import plots  # matplotlib's import is slow: only once there is something to draw

    confusion = evaluation.metrics.confusion
    per_class = report.per_class_table(confusion, classes)
    write_json(
        folder / TEST_METRICS_FILE,
        {
            **evaluation.metrics.scalars(),
            "test_images": evaluation.images,
            "predict_images_per_second": evaluation.images_per_second,
        },
    )
    write_csv(folder / PER_CLASS_FILE, per_class)
    write_csv(
        folder / CONFUSION_FILE, pd.DataFrame(confusion, columns=[f"predicted_{c}" for c in range(len(confusion))])
    )
    plots.confusion_matrix(confusion, folder / "confusion_matrix.png", title=f"{title}: test confusion matrix")
    return per_class


def record_trained_model(
    folder: Path,
    name: str,
    model: nn.Module,
    model_info: dict,
    history: list[EpochRecord],
    train_seconds: float,
    train_images: int,
    held_out: tuple[np.ndarray, np.ndarray],
    attempts: int = 1,
    evaluated_on: str = "test",
    classes: list | None = None,
    trained_by: dict | None = None,
) -> dict:
    """Everything a trained model leaves behind: curves, test evaluation, the exported model, its results row.

    Returns the results row (also written to results.json for `distml compare`); results.json is written last,
    so its presence means the run finished. `held_out` is (inputs, labels) of the test set, or of the validation
    holdout when there is none (`evaluated_on` says which). `attempts` counts the starts of a retried training;
    `trained_by`, what the workers of a distributed training recorded of themselves (world_size, ranks), joins the
    results row.
    """
    from distml import plots  # matplotlib's import is slow: only once there is something to draw

    history_frame = pd.DataFrame([asdict(record) for record in history])
    write_csv(folder / HISTORY_FILE, history_frame)
    plots.learning_curves(history_frame, folder / "learning_curves.png", title=name)
    evaluation = evaluate_test(model, *held_out)
    write_test_report(folder, evaluation, name, classes)
    scores = evaluation.metrics
    results = {
        "model": name,
        "evaluated_on": evaluated_on,
        "accuracy": scores.accuracy,
        "precision": scores.precision,
        "recall": scores.recall,
        "f1": scores.f1,
        "parameters": model_info["parameters"],
        "epochs": len(history),
        "train_seconds": train_seconds,
        "train_images_per_second": train_images * len(history) / max(train_seconds, 1e-9),
        "predict_images_per_second": evaluation.images_per_second,
        "attempts": attempts,
        **(trained_by or {}),
    }
    save_model(folder / MODEL_DIR, model, {**model_info, "test_accuracy": scores.accuracy})
    write_json(folder / RESULTS_FILE, results)
    return results


def read_trained_model(folder: Path) -> tuple[dict, list[EpochRecord]]:
    """The results row and history a finished run left in `folder` (what record_trained_model wrote)."""
    results = json.loads((folder / RESULTS_FILE).read_text())
    history = [EpochRecord(**row) for row in pd.read_csv(folder / HISTORY_FILE).to_dict("records")]
    return results, history
