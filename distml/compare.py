"""`distml compare`: one table and one chart over the models of several run folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from distml.atomic import write_csv
from distml.errors import DistmlError
from distml.models import build_model, count_parameters
from distml.rundir import CONFIG_FILE, FOLDS_FILE, RESULTS_FILE

COLUMNS = [
    "model",
    "evaluated_on",
    "accuracy",
    "accuracy_std",
    "precision",
    "recall",
    "f1",
    "f1_std",
    "parameters",
    "train_seconds",
    "train_images_per_second",
    "predict_images_per_second",
    "run_dir",
]
COMPARISON_FILE = "comparison.csv"


def _kfold_row(run_dir: Path, options: dict) -> dict:
    """A K-fold run's folds as mean ± std (validation, not test: K-fold never touches the test set)."""
    folds = pd.read_csv(run_dir / FOLDS_FILE)
    images_seen = folds["train_size"] * folds["epochs"]
    return {
        "model": f"{options['model']} ({len(folds)}-fold)",
        "evaluated_on": f"{len(folds)}-fold validation",
        "accuracy": folds["val_accuracy"].mean(),
        "accuracy_std": folds["val_accuracy"].std(ddof=1),
        "precision": folds["precision_macro"].mean(),
        "recall": folds["recall_macro"].mean(),
        "f1": folds["f1_macro"].mean(),
        "f1_std": folds["f1_macro"].std(ddof=1),
        "parameters": count_parameters(build_model(options["model"])),
        "train_seconds": folds["train_seconds"].mean(),
        "train_images_per_second": (images_seen / folds["train_seconds"]).mean(),
        "predict_images_per_second": math.nan,
    }


def run_row(run_dir: Path) -> dict:
    """The comparison row of one run folder (train, finetune or kfold)."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise DistmlError(f"{run_dir} holds no distml run (no {CONFIG_FILE})")
    config = json.loads(config_path.read_text())
    command = config.get("command")
    if command == "kfold":
        if not (run_dir / FOLDS_FILE).is_file():
            raise DistmlError(f"{run_dir}: the K-fold run has no {FOLDS_FILE} yet (unfinished?)")
        row = _kfold_row(run_dir, config["options"])
    elif (run_dir / RESULTS_FILE).is_file():
        row = {**json.loads((run_dir / RESULTS_FILE).read_text()), "accuracy_std": math.nan, "f1_std": math.nan}
    else:
        raise DistmlError(f"{run_dir}: the {command} run has no {RESULTS_FILE} (unfinished?)")
    return {**row, "run_dir": str(run_dir)}


def compare(run_dirs: list[Path]) -> pd.DataFrame:
    if not run_dirs:
        raise DistmlError("give at least one run folder")
    return pd.DataFrame([run_row(path) for path in run_dirs], columns=COLUMNS)


def write_comparison(table: pd.DataFrame, out: Path) -> None:
    from distml import plots  # matplotlib's import is slow: only once there is something to draw

    write_csv(Path(out) / COMPARISON_FILE, table)
    plots.comparison(table, Path(out) / "comparison.png")
