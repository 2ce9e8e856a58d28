"""What a cross-validation predicts: every example's out-of-fold probabilities, each fold model's predictions on the
test set, and the ensemble of all fold models, with their scores. numpy and pandas only (the driver's report).

Each finished fold leaves `folds/fold_N.npz` (made in its trainer, where the model is): its validation indices, their
class probabilities, its test-set probabilities when the run has a test set, and its pickled model when fold models
are kept. Everything here is built from those files, so a resumed run reports the folds of earlier sessions too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from distml.errors import DistmlError
from distml.scores import expected_calibration_error, log_loss, macro_scores

OOF_FILE = "oof"  # oof.csv or oof.parquet
OOF_SCORES_FILE = "oof_scores.csv"
OOF_CONFUSION_FILE = "oof_confusion_matrix.csv"
TEST_PREDICTIONS_FILE = "test_predictions.csv"
ENSEMBLE_SCORES_FILE = "ensemble_scores.csv"
ENSEMBLE_PER_CLASS_FILE = "ensemble_per_class.csv"
ENSEMBLE_CONFUSION_FILE = "ensemble_confusion_matrix.csv"


def read_outputs(path: Path) -> dict[str, np.ndarray]:
    """A fold's arrays: val_index, probabilities, and test_probabilities and model when it has them."""
    try:
        with np.load(path) as saved:
            return {name: saved[name] for name in saved.files}
    except (OSError, ValueError) as exc:
        raise DistmlError(
            f"{path} is unreadable ({type(exc).__name__}); delete it and its .json to redo that fold"
        ) from None


def probability_columns(classes) -> list[str]:
    """The probability column of each class, named after it."""
    return [f"p_{c}" for c in classes]


def split_column(repeat: int, fold: int, repeats: int) -> str:
    """A fold's column in test_predictions.csv."""
    return f"fold_{fold}" if repeats == 1 else f"repeat_{repeat}_fold_{fold}"


@dataclass(frozen=True)
class Scores:
    """Accuracy, macro precision/recall/F1 (scikit-learn's macro averages), log loss and top-label calibration error
    of predicted probabilities, with the confusion matrix (rows true, columns predicted)."""

    examples: int
    accuracy: float
    precision_macro: float
    recall_macro: float
    f1_macro: float
    log_loss: float
    calibration_error: float
    confusion: np.ndarray

    @classmethod
    def of(cls, labels: np.ndarray, probabilities: np.ndarray) -> Scores:
        classes = probabilities.shape[1]
        predicted = probabilities.argmax(1)
        confusion = np.bincount(labels * classes + predicted, minlength=classes * classes).reshape(classes, classes)
        precision, recall, f1 = macro_scores(confusion)
        return cls(
            examples=len(labels),
            accuracy=float(np.trace(confusion) / max(len(labels), 1)),
            precision_macro=precision,
            recall_macro=recall,
            f1_macro=f1,
            log_loss=log_loss(labels, probabilities),
            calibration_error=expected_calibration_error(labels, probabilities),
            confusion=confusion,
        )

    def table(self) -> pd.DataFrame:
        """metric, value rows."""
        values = {name: value for name, value in self.__dict__.items() if name != "confusion"}
        return pd.DataFrame({"metric": list(values), "value": list(values.values())})


def confusion_table(confusion: np.ndarray, classes) -> pd.DataFrame:
    """A confusion matrix with its classes named: rows true, columns predicted."""
    return pd.DataFrame(
        confusion, index=pd.Index(list(classes), name="true"), columns=[f"predicted_{c}" for c in classes]
    )


@dataclass(frozen=True)
class OutOfFold:
    table: pd.DataFrame  # one row per repeat and example: repeat, fold, index, [file | row], label, predicted, p_*
    scores: Scores  # over all rows


def out_of_fold(
    labels: np.ndarray, classes, outputs: dict[int, dict], k: int, identifiers: dict[str, tuple] | None = None
) -> OutOfFold:
    """Every example's predictions by the model of the fold that held it out, from each split's outputs (split
    s = repeat * k + fold). `identifiers`: extra columns by example, e.g. {"file": paths} or {"row": rows}."""
    names = np.asarray(list(classes), dtype=object)
    parts = []
    for split in sorted(outputs):
        repeat, fold = divmod(split, k)
        index = outputs[split]["val_index"]
        part = {"repeat": repeat, "fold": fold, "index": index}
        for column, values in (identifiers or {}).items():
            part[column] = np.asarray(values, dtype=object)[index]
        probabilities = outputs[split]["probabilities"]
        part.update(label=names[labels[index]], predicted=names[probabilities.argmax(1)])
        frame = pd.DataFrame(part)
        frame[probability_columns(classes)] = probabilities
        parts.append((frame, labels[index], probabilities))
    table = pd.concat([p[0] for p in parts], ignore_index=True).sort_values(["repeat", "index"], kind="stable")
    scores = Scores.of(np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]))
    return OutOfFold(table.reset_index(drop=True), scores)


@dataclass(frozen=True)
class Ensemble:
    """The test set's predictions: of each fold model, and of their ensemble (the mean of their probabilities)."""

    table: pd.DataFrame  # index, label, a column per fold model, ensemble_predicted, p_* of the ensemble
    scores: Scores  # the ensemble's
    per_class: pd.DataFrame
    fold_accuracies: list[float]  # each fold model's, in split order

    @property
    def gain(self) -> float:
        """The ensemble's accuracy over the mean single fold model's."""
        return self.scores.accuracy - float(np.mean(self.fold_accuracies))

    def summary(self) -> pd.DataFrame:
        """metric, value rows: the ensemble's scores, the mean fold model's accuracy and the gain."""
        extra = pd.DataFrame(
            {
                "metric": ["mean_fold_accuracy", "gain_over_mean_fold", "models"],
                "value": [float(np.mean(self.fold_accuracies)), self.gain, len(self.fold_accuracies)],
            }
        )
        return pd.concat([self.scores.table(), extra], ignore_index=True)


def ensemble(test_labels: np.ndarray, classes, outputs: dict[int, dict], k: int, repeats: int) -> Ensemble:
    """The fold models' and their ensemble's predictions on the test set (every split's outputs must have
    test_probabilities)."""
    from distml.report import per_class_table  # scipy comes with it: the report's, loaded by then

    names = np.asarray(list(classes), dtype=object)
    table = pd.DataFrame({"index": np.arange(len(test_labels)), "label": names[test_labels]})
    stacked, accuracies = [], []
    for split in sorted(outputs):
        probabilities = outputs[split]["test_probabilities"]
        predicted = probabilities.argmax(1)
        table[split_column(*divmod(split, k), repeats)] = names[predicted]
        accuracies.append(float((predicted == test_labels).mean()))
        stacked.append(probabilities.astype(np.float64))
    mean = np.mean(stacked, axis=0)
    table["ensemble_predicted"] = names[mean.argmax(1)]
    table[probability_columns(classes)] = mean
    scores = Scores.of(test_labels, mean)
    return Ensemble(table, scores, per_class_table(scores.confusion, list(classes)), accuracies)
