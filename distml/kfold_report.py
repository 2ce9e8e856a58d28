"""The files a K-fold run leaves, built from its finished folds (folds/fold_N.json and .npz), and read back.

folds.csv, history.csv and summary.csv (with the corrected interval); oof.csv (or .parquet), oof_scores.csv and the
out-of-fold confusion matrix; with a test set, test_predictions.csv and the ensemble's scores; with kept fold
models, fold_models/ and ensemble/; the plots; and report.md and report.html (run_report.py), which gather them for
a person.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from distml import plots, predictions, report, run_report
from distml.atomic import write_atomic, write_csv
from distml.config import KFoldConfig
from distml.datasets import Dataset
from distml.recipe import ModelRecipe
from distml.run_report import (
    ENSEMBLE_DIR,
    FOLD_ACCURACY_PLOT,
    FOLD_MODELS_DIR,
    LEARNING_CURVES_PLOT,
    OOF_CONFUSION_PLOT,
)
from distml.rundir import FOLDS_FILE, HISTORY_FILE, SUMMARY_FILE, outputs_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KFoldReport:
    folds: pd.DataFrame
    history: pd.DataFrame
    summary: pd.DataFrame
    oof: pd.DataFrame | None  # None when no fold left predictions (finished by a distml without them)
    oof_scores: pd.DataFrame | None
    ensemble_scores: pd.DataFrame | None  # with a test set


def oof_path(run_path: Path, oof_format: str) -> Path:
    return Path(run_path) / f"{predictions.OOF_FILE}.{oof_format}"


def write_report(
    run_path: Path,
    config: KFoldConfig,
    dataset: Dataset,
    test: Dataset | None,
    recipe: ModelRecipe,
    done: dict[int, dict],
) -> KFoldReport:
    """Every file of the run's report from its finished folds `done` (split -> fold result)."""
    run_path = Path(run_path)
    rows = [{column: result.get(column, 0) for column in report.FOLD_COLUMNS} for result in done.values()]
    history_rows = [
        {"repeat": result.get("repeat", 0), "fold": result["fold"], **epoch}
        for result in done.values()
        for epoch in json.loads(result["history_json"])
    ]
    folds = report.fold_table(rows)
    history = report.history_table(history_rows)
    summary = report.summary_table(folds)
    write_csv(run_path / FOLDS_FILE, folds)
    write_csv(run_path / HISTORY_FILE, history)
    write_csv(run_path / SUMMARY_FILE, summary)
    accuracy = summary.set_index("metric").loc["val_accuracy"]
    plots.fold_accuracy(
        folds,
        run_path / FOLD_ACCURACY_PLOT,
        interval=(accuracy["corrected_ci95_low"], accuracy["corrected_ci95_high"]),
    )
    plots.learning_curves(history, run_path / LEARNING_CURVES_PLOT)

    folds_dir = run_path / "folds"
    have = [split for split in sorted(done) if outputs_file(folds_dir, split).is_file()]
    if len(have) < len(done):  # folds finished by a distml that kept no predictions
        log.info(f"no predictions saved for {len(done) - len(have)} fold(s): out-of-fold files left out")
    if not have:
        return _finish(run_path, folds, history, summary, None, None)
    outputs = {split: predictions.read_outputs(outputs_file(folds_dir, split)) for split in have}
    oof = _write_oof(run_path, config, dataset, outputs)
    ensemble = None
    if test is not None:
        ensemble = predictions.ensemble(test.labels, dataset.classes, outputs, config.k, config.repeats)
        write_table(run_path / predictions.TEST_PREDICTIONS_FILE, ensemble.table)
        write_csv(run_path / predictions.ENSEMBLE_SCORES_FILE, ensemble.summary())
        write_csv(run_path / predictions.ENSEMBLE_PER_CLASS_FILE, ensemble.per_class)
        confusion = predictions.confusion_table(ensemble.scores.confusion, dataset.classes)
        write_atomic(run_path / predictions.ENSEMBLE_CONFUSION_FILE, lambda tmp: confusion.to_csv(tmp))
    if config.keep_fold_models:
        export_fold_models(run_path, config, dataset, recipe, [outputs_file(folds_dir, s) for s in have])
    return _finish(run_path, folds, history, summary, oof, ensemble)


def _write_oof(run_path: Path, config: KFoldConfig, dataset: Dataset, outputs: dict) -> predictions.OutOfFold:
    identifiers = None
    if dataset.paths is not None:
        identifiers = {"file": dataset.paths}
    elif dataset.rows is not None:
        identifiers = {"row": dataset.rows}
    oof = predictions.out_of_fold(dataset.labels, dataset.classes, outputs, config.k, identifiers)
    write_table(oof_path(run_path, config.oof_format), oof.table)
    write_csv(run_path / predictions.OOF_SCORES_FILE, oof.scores.table())
    confusion = predictions.confusion_table(oof.scores.confusion, dataset.classes)
    write_atomic(run_path / predictions.OOF_CONFUSION_FILE, lambda tmp: confusion.to_csv(tmp))
    plots.confusion_matrix(
        oof.scores.confusion, run_path / OOF_CONFUSION_PLOT, "Out-of-fold", classes=list(dataset.classes)
    )
    return oof


def write_table(path: Path, frame: pd.DataFrame) -> None:
    """A large table as CSV or Parquet (by the file's suffix) through Arrow's writers: a 60,000-row table of
    probabilities takes a tenth of a second, where pandas' CSV writer takes most of one."""
    import pyarrow as pa  # installed with Ray
    import pyarrow.csv
    import pyarrow.parquet

    table = pa.Table.from_pandas(frame, preserve_index=False)
    if path.suffix == ".parquet":
        write_atomic(path, lambda tmp: pyarrow.parquet.write_table(table, tmp))
    else:
        options = pyarrow.csv.WriteOptions(quoting_style="needed")
        write_atomic(path, lambda tmp: pyarrow.csv.write_csv(table, tmp, options))


def export_fold_models(
    run_path: Path, config: KFoldConfig, dataset: Dataset, recipe: ModelRecipe, files: list[Path]
) -> None:
    """Each fold's model as `train` exports one (fold_models/fold_N/), and the ensemble of them all (ensemble/)."""
    from distml.export import model_metadata, save_ensemble, save_model  # torch: only when models are kept

    started = time.perf_counter()
    folders, info = [], None
    for path in files:
        split = int(path.stem.split("_")[1])
        repeat, fold = divmod(split, config.k)
        with np.load(path) as saved:
            model = pickle.loads(saved["model"].tobytes())  # pickled by its own trainer for this run
        folder = run_path / FOLD_MODELS_DIR / predictions.split_column(repeat, fold, config.repeats)
        info = model_metadata(recipe, model, dataset, trained_with="distml kfold", repeat=repeat, fold=fold)
        save_model(folder, model, info)
        folders.append(folder)
    exported = time.perf_counter()
    save_ensemble(run_path / ENSEMBLE_DIR, folders, info)
    log.info(
        f"exported {len(folders)} fold models in {exported - started:.1f} s and their ensemble in "
        f"{time.perf_counter() - exported:.1f} s"
    )


def _finish(run_path, folds, history, summary, oof, ensemble) -> KFoldReport:
    run_report.build(run_path)  # report.md and report.html, from the files just written
    return KFoldReport(
        folds,
        history,
        summary,
        None if oof is None else oof.table,
        None if oof is None else oof.scores.table(),
        None if ensemble is None else ensemble.summary(),
    )


def read_report(run_path: Path, config: KFoldConfig) -> KFoldReport:
    """The report of a finished run, read back from its files."""
    run_path = Path(run_path)

    def optional(path: Path, read) -> pd.DataFrame | None:
        return read(path) if path.is_file() else None

    oof_file = oof_path(run_path, config.oof_format)
    return KFoldReport(
        pd.read_csv(run_path / FOLDS_FILE),
        pd.read_csv(run_path / HISTORY_FILE),
        pd.read_csv(run_path / SUMMARY_FILE),
        optional(oof_file, pd.read_parquet if config.oof_format == "parquet" else pd.read_csv),
        optional(run_path / predictions.OOF_SCORES_FILE, pd.read_csv),
        optional(run_path / predictions.ENSEMBLE_SCORES_FILE, pd.read_csv),
    )
