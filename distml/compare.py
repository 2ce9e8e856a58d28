"""`distml compare`: one table and one chart over the models of several run folders, and, between K-fold runs, a
decision per pair: are their scores different, and by more than matters?

K-fold runs on the same folds are paired fold by fold (by repeat and fold): the corrected paired t-test of Nadeau &
Bengio and the Bayesian correlated t-test of Corani & Benavoli, both widened for the training data that folds share,
judge the per-fold differences; McNemar's exact test judges the two ensembles' test predictions. Runs on different
folds cannot be paired: Welch's unpaired test stands in, and the comparison says why.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import stdtrit  # the t quantile, without importing all of scipy.stats

from distml import run_report
from distml.atomic import write_csv
from distml.errors import DistmlError
from distml.folds import assignment_hash, read_assignment
from distml.models import build_model, count_parameters
from distml.predictions import TEST_PREDICTIONS_FILE
from distml.rundir import ASSIGNMENT_FILE, CONFIG_FILE, FOLDS_FILE, RESULTS_FILE
from distml.stats import (
    bayesian_correlated_ttest,
    corrected_interval,
    corrected_paired_ttest,
    mcnemar_exact,
    welch_ttest,
)

COLUMNS = [
    "model",
    "evaluated_on",
    "accuracy",
    "accuracy_std",
    "accuracy_ci95_low",  # K-fold: Nadeau & Bengio's corrected interval of the mean validation accuracy
    "accuracy_ci95_high",
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
TEST_COLUMNS = [
    "run_a",
    "run_b",
    "metric",
    "test",
    "folds",
    "mean_a",
    "mean_b",
    "mean_difference",
    "ci95_low",
    "ci95_high",
    "t",
    "df",
    "p",
    "p_a_better",
    "p_equivalent",
    "p_b_better",
    "rope",
    "mcnemar_only_a_right",
    "mcnemar_only_b_right",
    "mcnemar_p",
    "verdict",
]
DIFFERENCE_COLUMNS = ["run_a", "run_b", "repeat", "fold", "difference"]  # positive: A better
METRICS = ("val_accuracy", "val_loss", "precision_macro", "recall_macro", "f1_macro", "test_accuracy", "test_loss")
COMPARISON_FILE = "comparison.csv"
COMPARED = ("kfold", "train", "finetune")  # the runs that end in a model's scores
TESTS_FILE = "paired_tests.csv"
DIFFERENCES_PLOT = "paired_differences.png"
PAIRED, UNPAIRED = "corrected paired t", "Welch (different folds)"
DECISION_PROBABILITY = 0.95  # a posterior this sure decides (Benavoli et al. 2017)
ALPHA = 0.05  # Welch's test, which has no posterior, decides at p below this


@dataclass(frozen=True)
class Comparison:
    """`runs`: one row per run folder (COLUMNS). `tests`: one row per pair of K-fold runs (TEST_COLUMNS), empty with
    fewer than two. `differences`: the per-fold differences of the paired ones (run_a, run_b, repeat, fold,
    difference; positive: A better). `refusals`: one line per pair whose paired test was refused, saying why."""

    runs: pd.DataFrame
    tests: pd.DataFrame
    differences: pd.DataFrame
    refusals: tuple[str, ...]


@dataclass(frozen=True)
class _Run:
    path: Path
    config: dict
    folds: pd.DataFrame | None  # a K-fold run's folds.csv (with `repeat`); None for train and finetune runs

    @property
    def is_kfold(self) -> bool:
        return self.folds is not None


def _read_run(run_dir: Path) -> _Run:
    """A finished run folder, or a one-line error naming the folder."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise DistmlError(f"{run_dir} holds no distml run (no {CONFIG_FILE})")
    try:
        config = json.loads(config_path.read_text())
        command = config.get("command") if isinstance(config, dict) else None
    except (OSError, ValueError) as exc:
        raise DistmlError(f"{config_path} cannot be read ({type(exc).__name__}): is it a distml run?") from None
    if command not in COMPARED:
        raise DistmlError(
            f"{run_dir} is {f'a {command} run' if command else 'not a run distml knows'}; compare takes the folders "
            f"of {', '.join(COMPARED)} runs" + (" (a pipeline's are inside it)" if command == "pipeline" else "")
        )
    if command == "kfold":
        if not (run_dir / FOLDS_FILE).is_file():
            raise DistmlError(f"{run_dir}: the K-fold run has no {FOLDS_FILE} yet (unfinished?)")
        folds = pd.read_csv(run_dir / FOLDS_FILE)
        if "repeat" not in folds.columns:  # runs from before repeats had one
            folds.insert(0, "repeat", 0)
        return _Run(run_dir, config, folds)
    if not (run_dir / RESULTS_FILE).is_file():
        raise DistmlError(f"{run_dir}: the {command} run has no {RESULTS_FILE} (unfinished?)")
    return _Run(run_dir, config, None)


def _sizes(folds: pd.DataFrame) -> tuple[float, float]:
    """(n_train, n_val): the mean training and validation sizes over the folds, as the corrections take them."""
    return float(folds["train_size"].mean()), float(folds["val_size"].mean())


def _kfold_row(run: _Run) -> dict:
    """A K-fold run's folds as mean ± std (validation, not test: K-fold never touches the test set)."""
    folds, options = run.folds, run.config["options"]
    k, repeats = options.get("k", len(folds)), options.get("repeats", 1)
    images_seen = folds["train_size"] * folds["epochs"]
    _, low, high = corrected_interval(folds["val_accuracy"], *_sizes(folds))
    return {
        "model": f"{options['model']} ({k}-fold" + (f" x{repeats})" if repeats > 1 else ")"),
        "evaluated_on": f"{k}-fold validation" + (f", {repeats} repeats" if repeats > 1 else ""),
        "accuracy": folds["val_accuracy"].mean(),
        "accuracy_std": folds["val_accuracy"].std(ddof=1),
        "accuracy_ci95_low": low,
        "accuracy_ci95_high": high,
        "precision": folds["precision_macro"].mean(),
        "recall": folds["recall_macro"].mean(),
        "f1": folds["f1_macro"].mean(),
        "f1_std": folds["f1_macro"].std(ddof=1),
        "parameters": count_parameters(build_model(options["model"])),
        "train_seconds": folds["train_seconds"].mean(),
        "train_images_per_second": (images_seen / folds["train_seconds"]).mean(),
        "predict_images_per_second": math.nan,
    }


def _row(run: _Run) -> dict:
    if run.is_kfold:
        row = _kfold_row(run)
    else:
        row = {**json.loads((run.path / RESULTS_FILE).read_text()), "accuracy_std": math.nan, "f1_std": math.nan}
    return {**row, "run_dir": str(run.path)}


def compare(run_dirs: list[Path]) -> pd.DataFrame:
    """The per-run table: one row per run folder (train, finetune or kfold)."""
    if not run_dirs:
        raise DistmlError("give at least one run folder")
    return pd.DataFrame([_row(_read_run(path)) for path in run_dirs], columns=COLUMNS)


def decide(run_dirs: list[Path], metric: str = "val_accuracy", rope: float = 0.005) -> Comparison:
    """The per-run table and, for every pair of the K-fold runs among `run_dirs` (each unordered pair once, in the
    given order), the tests of `metric` between them, with a region of practical equivalence of ±`rope` in the
    metric's units. Every input is checked before anything is computed; nothing is written."""
    if not rope >= 0 or math.isinf(rope):  # `not >=` also refuses nan
        raise DistmlError(f"must be a finite number of at least 0, got {rope}", option="--rope")
    if metric not in METRICS:
        raise DistmlError(f"unknown metric '{metric}'; choose one of {', '.join(METRICS)}", option="--metric")
    if not run_dirs:
        raise DistmlError("give at least one run folder")
    runs = [_read_run(path) for path in run_dirs]
    tests, differences, refusals = _test_pairs([run for run in runs if run.is_kfold], metric, rope)
    return Comparison(pd.DataFrame([_row(run) for run in runs], columns=COLUMNS), tests, differences, refusals)


def _test_pairs(kfold_runs: list[_Run], metric: str, rope: float) -> tuple[pd.DataFrame, pd.DataFrame, tuple]:
    """Comparison's tests, differences and refusals for every pair of `kfold_runs`, each checked first."""
    pairs = list(combinations(kfold_runs, 2))
    if not pairs:
        return pd.DataFrame(columns=TEST_COLUMNS), pd.DataFrame(columns=DIFFERENCE_COLUMNS), ()
    for a, b in pairs:
        _check_same_dataset(a, b)
    for run in kfold_runs:
        if run.folds[metric].isna().all():
            raise DistmlError(
                f"{run.path}: {FOLDS_FILE} has no {metric} (a run without a test set?)", option="--metric"
            )
    hashes = {run.path: _assignment_hash(run) for run in kfold_runs}
    predictions = {run.path: _test_predictions(run) for run in kfold_runs}
    rows, differences, refusals = [], [], []
    for a, b in pairs:
        if hashes[a.path] == hashes[b.path]:
            row, per_fold = _paired(a, b, metric, rope)
            differences.append(per_fold)
        else:
            row = _unpaired(a, b, metric)
            refusals.append(
                f"paired test refused: {a.path} and {b.path} used different fold assignments "
                f"(hash {hashes[a.path]} vs {hashes[b.path]}); Welch's unpaired test instead"
            )
        row.update(_mcnemar(a, b, predictions[a.path], predictions[b.path]))
        row = {"run_a": str(a.path), "run_b": str(b.path), "metric": metric, "rope": rope, **row}
        rows.append({**row, "verdict": _verdict(row)})
    counts = {"mcnemar_only_a_right": "Int64", "mcnemar_only_b_right": "Int64"}  # whole numbers, or empty
    tests = pd.DataFrame(rows, columns=TEST_COLUMNS).astype(counts)
    if not differences:  # every pair on different folds
        return tests, pd.DataFrame(columns=DIFFERENCE_COLUMNS), tuple(refusals)
    return tests, pd.concat(differences, ignore_index=True), tuple(refusals)


def _check_same_dataset(a: _Run, b: _Run) -> None:
    data_a, data_b = a.config.get("dataset", {}), b.config.get("dataset", {})
    if data_a.get("digest") != data_b.get("digest"):
        raise DistmlError(
            f"{a.path} and {b.path} are K-fold runs of different datasets (digest {data_a.get('digest')} of "
            f"{data_a.get('source')} vs {data_b.get('digest')} of {data_b.get('source')}): their scores do not compare"
        )


def _assignment_hash(run: _Run) -> str:
    """config.json's fold_assignment_hash; for runs from before it was recorded, computed from the folds file."""
    if "fold_assignment_hash" in run.config:
        return run.config["fold_assignment_hash"]
    if not (run.path / ASSIGNMENT_FILE).is_file():
        raise DistmlError(f"{run.path}: neither a fold_assignment_hash in {CONFIG_FILE} nor an {ASSIGNMENT_FILE}")
    return assignment_hash(read_assignment(run.path / ASSIGNMENT_FILE))


def _test_predictions(run: _Run) -> pd.DataFrame | None:
    path = run.path / TEST_PREDICTIONS_FILE
    return pd.read_csv(path, usecols=["label", "ensemble_predicted"]) if path.is_file() else None


def _signed(metric: str) -> int:
    """+1 where higher is better; -1 for a loss, so that every difference reads 'positive: A better'."""
    return -1 if metric.endswith("loss") else 1


def _paired(a: _Run, b: _Run, metric: str, rope: float) -> tuple[dict, pd.DataFrame]:
    """The corrected paired t-test and the Bayesian correlated t-test on the per-fold differences A - B (B - A for a
    loss), folds matched by (repeat, fold)."""
    columns = ["repeat", "fold", "train_size", "val_size", metric]
    joined = a.folds[columns].merge(b.folds[columns], on=["repeat", "fold"], suffixes=("_a", "_b"))
    if len(joined) < 2:
        raise DistmlError(f"{a.path} and {b.path} share {len(joined)} finished fold(s); a paired test needs 2")
    differences = _signed(metric) * (joined[f"{metric}_a"] - joined[f"{metric}_b"]).to_numpy()
    n_train = (joined["train_size_a"].mean() + joined["train_size_b"].mean()) / 2
    n_val = (joined["val_size_a"].mean() + joined["val_size_b"].mean()) / 2
    mean, low, high = corrected_interval(differences, n_train, n_val)
    ttest = corrected_paired_ttest(differences, n_train, n_val)
    bayes = bayesian_correlated_ttest(differences, rho=n_val / (n_train + n_val), rope=rope)
    row = {
        "test": PAIRED,
        "folds": len(joined),
        "mean_a": joined[f"{metric}_a"].mean(),
        "mean_b": joined[f"{metric}_b"].mean(),
        "mean_difference": mean,
        "ci95_low": low,
        "ci95_high": high,
        "t": ttest.t,
        "df": ttest.df,
        "p": ttest.p,
        "p_a_better": bayes.p_a_better,
        "p_equivalent": bayes.p_equivalent,
        "p_b_better": bayes.p_b_better,
    }
    per_fold = joined[["repeat", "fold"]].assign(run_a=str(a.path), run_b=str(b.path), difference=differences)
    return row, per_fold[DIFFERENCE_COLUMNS]


def _unpaired(a: _Run, b: _Run, metric: str) -> dict:
    """Welch's t-test of the two runs' fold scores, signed as _paired's, with its 95% interval; `folds` counts the
    scores of both runs."""
    values_a, values_b = a.folds[metric].dropna().to_numpy(), b.folds[metric].dropna().to_numpy()
    if min(len(values_a), len(values_b)) < 2:
        raise DistmlError(f"{a.path} and {b.path}: Welch's test needs at least 2 folds with {metric} in each")
    sign = _signed(metric)
    ttest = welch_ttest(sign * values_a, sign * values_b)
    standard_error = math.sqrt(values_a.var(ddof=1) / len(values_a) + values_b.var(ddof=1) / len(values_b))
    half = float(stdtrit(ttest.df, 0.975)) * standard_error if not math.isnan(ttest.df) else math.nan
    return {
        "test": UNPAIRED,
        "folds": len(values_a) + len(values_b),
        "mean_a": values_a.mean(),
        "mean_b": values_b.mean(),
        "mean_difference": ttest.mean,
        "ci95_low": ttest.mean - half,
        "ci95_high": ttest.mean + half,
        "t": ttest.t,
        "df": ttest.df,
        "p": ttest.p,
        "p_a_better": math.nan,
        "p_equivalent": math.nan,
        "p_b_better": math.nan,
    }


def _mcnemar(a: _Run, b: _Run, predictions_a: pd.DataFrame | None, predictions_b: pd.DataFrame | None) -> dict:
    """McNemar's exact test on the ensembles' test predictions, where both runs have them (NaN otherwise)."""
    if predictions_a is None or predictions_b is None:
        return {"mcnemar_only_a_right": math.nan, "mcnemar_only_b_right": math.nan, "mcnemar_p": math.nan}
    if not np.array_equal(predictions_a["label"].to_numpy(), predictions_b["label"].to_numpy()):
        raise DistmlError(
            f"{a.path} and {b.path}: the {TEST_PREDICTIONS_FILE} files are not over the same test set (their labels "
            "differ)"
        )
    only_a, only_b, p = mcnemar_exact(
        predictions_a["ensemble_predicted"] == predictions_a["label"],
        predictions_b["ensemble_predicted"] == predictions_b["label"],
    )
    return {"mcnemar_only_a_right": only_a, "mcnemar_only_b_right": only_b, "mcnemar_p": p}


def _verdict(row: dict) -> str:
    """In words: a paired pair by its posterior (sure at 0.95), a Welch pair by its p (below 0.05)."""
    p = f"p={row['p']:.2g}"
    if row["test"] == UNPAIRED:
        if row["p"] < ALPHA:
            return f"{'A' if row['mean_difference'] > 0 else 'B'} better ({p}, Welch)"
        return f"no decision ({p}, Welch)"
    if row["p_a_better"] >= DECISION_PROBABILITY:
        return f"A better ({p}; P(A better)={_probability(row['p_a_better'])})"
    if row["p_b_better"] >= DECISION_PROBABILITY:
        return f"B better ({p}; P(B better)={_probability(row['p_b_better'])})"
    if row["p_equivalent"] >= DECISION_PROBABILITY:
        return f"equivalent within ±{row['rope']:g} (P={_probability(row['p_equivalent'])})"
    return "no decision"


def _probability(value: float) -> str:
    """Three significant digits, without rounding a posterior short of certainty up to 1."""
    return f"{value:.3g}" if value < 0.9995 or value == 1 else ">0.999"


def _write_runs(table: pd.DataFrame, out: Path) -> None:
    from distml import plots  # matplotlib's import is slow: only once there is something to draw

    write_csv(Path(out) / COMPARISON_FILE, table)
    plots.comparison(table, Path(out) / "comparison.png")


def write_comparison(table: pd.DataFrame, out: Path) -> None:
    """comparison.csv and comparison.png: the per-run table; then report.md and report.html."""
    _write_runs(table, out)
    run_report.build(out)


def write_decision(comparison: Comparison, out: Path) -> None:
    """The per-run table, and with pairs of K-fold runs paired_tests.csv and paired_differences.png; then report.md
    and report.html."""
    from distml import plots  # see _write_runs

    _write_runs(comparison.runs, out)
    if len(comparison.tests):
        write_csv(Path(out) / TESTS_FILE, comparison.tests)
        plots.paired_differences(comparison.tests, comparison.differences, Path(out) / DIFFERENCES_PLOT)
    run_report.build(out)
