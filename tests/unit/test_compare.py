"""distml.compare on K-fold run folders written here by hand: the numbers of every test against the formulas, worked
out again with scipy.stats; the Welch fallback for runs on different folds; runs from before fold_assignment_hash;
McNemar's counts; the sign of a loss; bad input."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

import distml
from distml.compare import PAIRED, TESTS_FILE, UNPAIRED, Comparison, decide, write_decision
from distml.errors import DistmlError
from distml.folds import assignment_hash, repeated_fold_assignment, write_assignment

EXAMPLES, K = 1003, 5  # 1,003 examples: the folds differ in size, so the mean sizes matter
LABELS = np.random.default_rng(7).integers(0, 10, EXAMPLES)
# per-fold validation accuracy of two models on the same 2 x 5 folds: B about 0.8 points below A, with noise
ACCURACY_A = [0.9712, 0.9688, 0.9731, 0.9654, 0.9702, 0.9695, 0.9741, 0.9667, 0.9709, 0.9684]
ACCURACY_B = [0.9641, 0.9619, 0.9632, 0.9598, 0.9625, 0.9604, 0.9650, 0.9603, 0.9611, 0.9622]


def write_kfold_run(
    path,
    val_accuracy,
    *,
    repeats=2,
    seed=0,
    val_loss=None,
    digest="5f1c0e2a9b3d7e44",
    hash_in_config=True,
    predictions=None,
    test_labels=None,
):
    """A finished K-fold run folder as distml writes it: config.json, folds.csv (rows in the order folds finished,
    not sorted), fold_assignment.csv; test_predictions.csv when `predictions` is given. hash_in_config=False writes
    a run from before repeats and assignment hashes: no hash, no `repeats`, no `repeat` column, the older
    index,label,fold assignment file."""
    path.mkdir(parents=True)
    assignment = repeated_fold_assignment(LABELS, K, repeats, seed)
    val_sizes = np.array([[np.sum(row == fold) for fold in range(K)] for row in assignment]).ravel()
    scores = np.asarray(val_accuracy)
    folds = pd.DataFrame(
        {
            "repeat": np.repeat(np.arange(repeats), K),
            "fold": np.tile(np.arange(K), repeats),
            "train_size": EXAMPLES - val_sizes,
            "val_size": val_sizes,
            "val_accuracy": scores,
            "val_loss": val_loss if val_loss is not None else 0.9 * (1 - scores),
            "precision_macro": scores - 0.001,
            "recall_macro": scores - 0.002,
            "f1_macro": scores - 0.0015,
            "test_accuracy": math.nan if predictions is None else scores + 0.001,
            "test_loss": math.nan,
            "epochs": 3,
            "train_seconds": 4.2,
            "node": "10.0.0.1",
        }
    ).iloc[np.random.default_rng(zlib.crc32(path.name.encode())).permutation(repeats * K)]  # each run its own order
    options = {"k": K, "repeats": repeats, "model": "mlp", "epochs": 3, "seed": seed}
    config = {
        "command": "kfold",
        "options": options,
        "dataset": {"source": "mnist", "examples": EXAMPLES, "digest": digest},
        "fold_assignment_hash": assignment_hash(assignment),
    }
    if hash_in_config:
        write_assignment(path / "fold_assignment.csv", LABELS, assignment)
    else:
        assert repeats == 1
        del options["repeats"], config["fold_assignment_hash"]
        folds = folds.drop(columns=["repeat"])
        table = np.column_stack([np.arange(EXAMPLES), LABELS, assignment[0]])
        np.savetxt(path / "fold_assignment.csv", table, fmt="%d", delimiter=",", header="index,label,fold", comments="")
    (path / "config.json").write_text(json.dumps(config))
    folds.to_csv(path / "folds.csv", index=False)
    if predictions is not None:
        pd.DataFrame(
            {"index": np.arange(len(test_labels)), "label": test_labels, "ensemble_predicted": predictions}
        ).to_csv(path / "test_predictions.csv", index=False)
    return path


def corrected_t(differences, n_train, n_val):
    """Nadeau & Bengio's corrected statistic, worked out again here: (t, two-sided p, scale, J - 1)."""
    differences = np.asarray(differences)
    count = len(differences)
    scale = math.sqrt((1 / count + n_val / n_train) * differences.var(ddof=1))
    t = differences.mean() / scale
    return t, 2 * scipy_stats.t.sf(abs(t), count - 1), scale, count - 1


def sizes(run):
    folds = pd.read_csv(run / "folds.csv")
    return folds["train_size"].mean(), folds["val_size"].mean()


@pytest.fixture
def two_runs(tmp_path):
    return write_kfold_run(tmp_path / "kfold-a", ACCURACY_A), write_kfold_run(tmp_path / "kfold-b", ACCURACY_B)


def test_a_pair_on_the_same_folds_gets_the_corrected_and_the_bayesian_test(two_runs):
    a, b = two_runs
    comparison = decide([a, b])
    assert isinstance(comparison, Comparison) and comparison.refusals == ()
    test = comparison.tests.iloc[0]
    differences = np.subtract(ACCURACY_A, ACCURACY_B)  # folds.csv rows are shuffled: paired by (repeat, fold)
    n_train, n_val = sizes(a)
    assert n_train + n_val == EXAMPLES and n_val == pytest.approx(EXAMPLES / K)
    t, p, scale, df = corrected_t(differences, n_train, n_val)
    assert (test["run_a"], test["run_b"], test["metric"], test["test"]) == (str(a), str(b), "val_accuracy", PAIRED)
    assert test["folds"] == 10 and test["df"] == df == 9
    assert test["mean_a"] == pytest.approx(np.mean(ACCURACY_A)) and test["mean_b"] == pytest.approx(np.mean(ACCURACY_B))
    assert test["mean_difference"] == pytest.approx(differences.mean())
    assert test["t"] == pytest.approx(t) and test["p"] == pytest.approx(p)
    half = scipy_stats.t.ppf(0.975, df) * scale
    assert (test["ci95_low"], test["ci95_high"]) == pytest.approx(
        (differences.mean() - half, differences.mean() + half)
    )
    # Corani & Benavoli: the posterior of the mean difference is Student's t, its scale widened by rho / (1 - rho)
    rho = n_val / EXAMPLES
    posterior = scipy_stats.t(
        df, loc=differences.mean(), scale=math.sqrt((1 / 10 + rho / (1 - rho)) * differences.var(ddof=1))
    )
    assert test["p_a_better"] == pytest.approx(posterior.sf(0.005))
    assert test["p_equivalent"] == pytest.approx(posterior.cdf(0.005) - posterior.cdf(-0.005))
    assert test["p_b_better"] == pytest.approx(posterior.cdf(-0.005))
    assert test["rope"] == 0.005 and math.isnan(test["mcnemar_p"])
    assert 0.95 <= test["p_a_better"] < 1 and p < 0.001  # 0.8 points with a spread of 0.2: A is better
    assert test["verdict"] == f"A better (p={p:.2g}; P(A better)={test['p_a_better']:.3g})"


def test_the_per_run_table_keeps_its_rows_and_gains_the_corrected_interval(two_runs, tmp_path):
    a, b = two_runs
    runs = decide([a, b]).runs
    assert runs["model"].tolist() == ["mlp (5-fold x2)", "mlp (5-fold x2)"]
    assert runs["evaluated_on"].tolist() == ["5-fold validation, 2 repeats"] * 2
    t, _, scale, df = corrected_t(ACCURACY_A, *sizes(a))  # the interval of the accuracy: the same correction
    half = scipy_stats.t.ppf(0.975, df) * scale
    row = runs.iloc[0]
    assert row["accuracy"] == pytest.approx(np.mean(ACCURACY_A))
    assert (row["accuracy_ci95_low"], row["accuracy_ci95_high"]) == pytest.approx(
        (np.mean(ACCURACY_A) - half, np.mean(ACCURACY_A) + half)
    )
    plain_half = scipy_stats.t.ppf(0.975, df) * np.std(ACCURACY_A, ddof=1) / math.sqrt(10)
    assert half > 1.5 * plain_half  # 1/J + 1/4 against 1/J: the correction widens it


def test_each_unordered_pair_once_in_the_given_order_and_other_runs_only_in_the_table(two_runs, tmp_path):
    a, b = two_runs
    noise = [0.004, -0.002, 0.005, -0.003, 0.002, -0.004, 0.003, 0.001, -0.001, 0.0]
    c = write_kfold_run(tmp_path / "kfold-c", np.add(ACCURACY_A, noise))
    train = tmp_path / "train-mlp"
    train.mkdir()
    (train / "config.json").write_text(json.dumps({"command": "train", "options": {"model": "mlp"}}))
    (train / "results.json").write_text(json.dumps({"model": "mlp", "evaluated_on": "test", "accuracy": 0.975}))
    comparison = decide([c, train, a, b])
    assert len(comparison.runs) == 4 and math.isnan(comparison.runs.iloc[1]["accuracy_ci95_low"])
    pairs = list(zip(comparison.tests["run_a"], comparison.tests["run_b"], strict=True))
    assert pairs == [(str(c), str(a)), (str(c), str(b)), (str(a), str(b))]
    # C is A give or take 0.3 points: inside the ROPE of half a point, and the posterior is sure of it
    n_train, n_val = sizes(a)
    _, _, scale, df = corrected_t(noise, n_train, n_val)  # the posterior's scale: rho / (1 - rho) = n_val / n_train
    posterior = scipy_stats.t(df, loc=np.mean(noise), scale=scale)
    p_equivalent = posterior.cdf(0.005) - posterior.cdf(-0.005)
    assert comparison.tests.iloc[0]["p_equivalent"] == pytest.approx(p_equivalent) and p_equivalent > 0.95
    assert comparison.tests.iloc[0]["verdict"] == f"equivalent within ±0.005 (P={p_equivalent:.3g})"
    assert len(comparison.differences) == 30 and set(comparison.differences["fold"]) == set(range(K))


def test_a_difference_at_the_edge_of_the_rope_is_no_decision(two_runs, tmp_path):
    a, _ = two_runs
    edge = np.subtract(ACCURACY_A, [0.007, 0.003, 0.006, 0.004, 0.005, 0.008, 0.002, 0.005, 0.006, 0.004])
    test = decide([a, write_kfold_run(tmp_path / "kfold-edge", edge)]).tests.iloc[0]
    assert test["p"] < 0.05  # different, but not surely by more than half a point
    assert max(test["p_a_better"], test["p_equivalent"], test["p_b_better"]) < 0.95
    assert test["verdict"] == "no decision"


def test_runs_on_different_folds_get_welchs_test_and_say_why(two_runs, tmp_path):
    a, _ = two_runs
    other = write_kfold_run(tmp_path / "kfold-other-seed", ACCURACY_B, seed=1)
    comparison = decide([a, other])
    test = comparison.tests.iloc[0]
    welch = scipy_stats.ttest_ind(ACCURACY_A, ACCURACY_B, equal_var=False)
    assert test["test"] == UNPAIRED and test["folds"] == 20
    assert test["t"] == pytest.approx(welch.statistic) and test["p"] == pytest.approx(welch.pvalue)
    variance_of_difference = np.var(ACCURACY_A, ddof=1) / 10 + np.var(ACCURACY_B, ddof=1) / 10
    df = variance_of_difference**2 / (
        (np.var(ACCURACY_A, ddof=1) / 10) ** 2 / 9 + (np.var(ACCURACY_B, ddof=1) / 10) ** 2 / 9
    )
    assert test["df"] == pytest.approx(df)
    half = scipy_stats.t.ppf(0.975, df) * math.sqrt(variance_of_difference)
    difference = np.mean(ACCURACY_A) - np.mean(ACCURACY_B)
    assert (test["ci95_low"], test["ci95_high"]) == pytest.approx((difference - half, difference + half))
    assert math.isnan(test["p_a_better"]) and math.isnan(test["p_equivalent"]) and math.isnan(test["p_b_better"])
    assert test["verdict"] == f"A better (p={welch.pvalue:.2g}, Welch)"
    hash_a = json.loads((a / "config.json").read_text())["fold_assignment_hash"]
    hash_other = json.loads((other / "config.json").read_text())["fold_assignment_hash"]
    assert hash_a != hash_other
    assert comparison.refusals == (
        f"paired test refused: {a} and {other} used different fold assignments (hash {hash_a} vs {hash_other}); "
        "Welch's unpaired test instead",
    )
    assert comparison.differences.empty


def test_older_runs_without_a_hash_are_paired_by_their_fold_assignment_file(tmp_path):
    old_a = write_kfold_run(tmp_path / "old-a", ACCURACY_A[:K], repeats=1, hash_in_config=False)
    old_b = write_kfold_run(tmp_path / "old-b", ACCURACY_B[:K], repeats=1, hash_in_config=False)
    old_other = write_kfold_run(tmp_path / "old-c", ACCURACY_B[:K], repeats=1, seed=3, hash_in_config=False)
    assert "fold_assignment_hash" not in json.loads((old_a / "config.json").read_text())
    comparison = decide([old_a, old_b, old_other])
    assert comparison.tests["test"].tolist() == [PAIRED, UNPAIRED, UNPAIRED]
    assert comparison.runs["model"].tolist() == ["mlp (5-fold)"] * 3
    paired = comparison.tests.iloc[0]
    t, p, _, _ = corrected_t(np.subtract(ACCURACY_A[:K], ACCURACY_B[:K]), *sizes(old_a))
    assert paired["folds"] == K and paired["df"] == K - 1
    assert paired["t"] == pytest.approx(t) and paired["p"] == pytest.approx(p)
    hash_a = assignment_hash(repeated_fold_assignment(LABELS, K, 1, 0))
    hash_c = assignment_hash(repeated_fold_assignment(LABELS, K, 1, 3))
    assert f"(hash {hash_a} vs {hash_c})" in comparison.refusals[0]


def test_mcnemar_counts_the_test_examples_only_one_ensemble_gets_right(tmp_path):
    labels = np.arange(40) % 10
    predicted_a, predicted_b = labels.copy(), labels.copy()
    predicted_a[[0, 1]] = 9 - labels[[0, 1]]  # A wrong on 0 and 1 (and B right)
    predicted_b[[2, 3, 4, 5, 6]] = (labels[[2, 3, 4, 5, 6]] + 1) % 10  # B wrong on 2..6 (A right)
    predicted_a[7] = predicted_b[7] = (labels[7] + 3) % 10  # both wrong: not a discordant pair
    a = write_kfold_run(tmp_path / "a", ACCURACY_A, predictions=predicted_a, test_labels=labels)
    b = write_kfold_run(tmp_path / "b", ACCURACY_B, predictions=predicted_b, test_labels=labels)
    c = write_kfold_run(tmp_path / "c", ACCURACY_B)  # no test set
    tests = decide([a, b, c]).tests
    assert tests.iloc[0][["mcnemar_only_a_right", "mcnemar_only_b_right"]].tolist() == [5, 2]
    assert tests.iloc[0]["mcnemar_p"] == pytest.approx(scipy_stats.binomtest(2, 7, 0.5).pvalue)
    assert tests.iloc[1:][["mcnemar_only_a_right", "mcnemar_only_b_right", "mcnemar_p"]].isna().all().all()


def test_a_loss_is_better_lower_so_its_differences_are_b_minus_a(tmp_path):
    loss_a = np.linspace(0.090, 0.099, 10)
    loss_b = loss_a + np.array([0.021, 0.018, 0.025, 0.019, 0.022, 0.020, 0.024, 0.017, 0.023, 0.021])
    a = write_kfold_run(tmp_path / "a", ACCURACY_B, val_loss=loss_a)  # worse accuracy, lower loss
    b = write_kfold_run(tmp_path / "b", ACCURACY_A, val_loss=loss_b)
    test = decide([a, b], metric="val_loss").tests.iloc[0]
    assert test["metric"] == "val_loss"
    assert test["mean_a"] == pytest.approx(loss_a.mean()) and test["mean_b"] == pytest.approx(loss_b.mean())
    assert test["mean_difference"] == pytest.approx(np.mean(loss_b - loss_a)) and test["mean_difference"] > 0
    t, p, _, _ = corrected_t(loss_b - loss_a, *sizes(a))
    assert test["t"] == pytest.approx(t) and t > 0 and test["p"] == pytest.approx(p)
    assert test["ci95_low"] > 0 and test["p_a_better"] > 0.95 and test["verdict"].startswith("A better")
    accuracy = decide([a, b]).tests.iloc[0]
    assert accuracy["mean_difference"] < 0 and accuracy["verdict"].startswith("B better")


def test_the_files_hold_the_tables(two_runs, tmp_path):
    a, b = two_runs
    comparison = decide([a, b], rope=0.01)
    write_decision(comparison, tmp_path / "out")
    written = pd.read_csv(tmp_path / "out" / TESTS_FILE)
    assert written.columns.tolist() == comparison.tests.columns.tolist()
    assert written.loc[0, "p"] == pytest.approx(comparison.tests.loc[0, "p"]) and written.loc[0, "rope"] == 0.01
    assert written.loc[0, "verdict"] == comparison.tests.loc[0, "verdict"]
    assert pd.read_csv(tmp_path / "out" / "comparison.csv")["accuracy_ci95_low"].notna().all()
    for figure in ("comparison.png", "paired_differences.png"):
        assert (tmp_path / "out" / figure).stat().st_size > 5000


def test_one_kfold_run_writes_no_tests(two_runs, tmp_path):
    a, _ = two_runs
    comparison = distml.compare([str(a)], metric="val_loss", rope=0.0)
    assert len(comparison.runs) == 1 and comparison.tests.empty
    write_decision(comparison, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "comparison.csv",
        "comparison.png",
        "report.html",
        "report.md",
    ]


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        ({"rope": -0.01}, ["--rope: must be a finite number of at least 0"]),
        ({"rope": math.nan}, ["--rope: "]),
        ({"metric": "val_acc"}, ["--metric: unknown metric 'val_acc'", "val_accuracy, val_loss, precision_macro"]),
        ({"metric": "test_accuracy"}, ["--metric: ", "has no test_accuracy"]),
    ],
)
def test_bad_options_are_refused(two_runs, kwargs, fragments):
    with pytest.raises(DistmlError) as error:
        decide(list(two_runs), **kwargs)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_runs_of_different_datasets_are_refused_naming_both(two_runs, tmp_path):
    a, _ = two_runs
    other = write_kfold_run(tmp_path / "kfold-fashion", ACCURACY_B, digest="0badc0ffee000000")
    with pytest.raises(DistmlError, match="different datasets") as error:
        decide([a, other])
    assert "5f1c0e2a9b3d7e44 of mnist vs 0badc0ffee000000 of mnist" in str(error.value)
