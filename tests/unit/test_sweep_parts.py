"""The sweep's plain torch and pandas pieces, on tiny tensors and made-up trial records: no Ray."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from distml.config import ClusterConfig, SweepConfig
from distml.distributed.tune import FoldStates, TrialRecord, sweep_epoch, sweep_splits
from distml.errors import DistmlError
from distml.export import save_model
from distml.folds import SplitData, fold_assignment, fold_indices, holdout_assignment, stratified_subset
from distml.progress import FOLDS_KEY
from distml.resnet import HeadOnFrozenBackbone, MnistResNet, backbone_features, build_resnet18, full_model
from distml.resnet import sweep_state as trial_state
from distml.stats import corrected_interval
from distml.sweep import (
    BEST_FILE,
    PLOT_FILE,
    TRIAL_FOLDS_FILE,
    TRIALS_FILE,
    _write_results,
    best_row,
    history_table,
    trial_table,
)
from distml.train import Diverged, fit

CONFIG = SweepConfig(weights="none", image_size=32, epochs=1, batch_size=16)


@pytest.fixture(scope="module")
def initial_state() -> dict:
    torch.manual_seed(0)
    return build_resnet18("none", 10, 32).state_dict()


def holdout_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The sweep's holdout: fold 1 of folds.holdout_assignment validates."""
    return fold_indices(holdout_assignment(labels, val_fraction, seed), 1)


def test_holdout_split_is_stratified_disjoint_and_repeatable():
    labels = np.repeat(np.arange(10), 50)
    train_index, val_index = holdout_split(labels, 0.2, seed=3)
    assert len(val_index) == 100 and len(train_index) == 400
    assert not set(train_index) & set(val_index)
    assert np.bincount(labels[val_index]).tolist() == [10] * 10
    assert np.array_equal(val_index, holdout_split(labels, 0.2, seed=3)[1])
    assert not np.array_equal(val_index, holdout_split(labels, 0.2, seed=4)[1])


def test_stratified_subset_keeps_class_proportions():
    labels = np.repeat(np.arange(10), 100)
    subset = stratified_subset(labels, 200, seed=0)
    assert len(subset) == 200 and np.bincount(labels[subset]).tolist() == [20] * 10
    assert len(stratified_subset(labels, 5000, seed=0)) == 1000


def test_cached_features_train_the_same_head_as_the_backbone_run_every_batch(initial_state):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(48, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (48,), generator=generator)
    train_index, val_index = torch.arange(32), torch.arange(32, 48)
    cached = trial_state(CONFIG, 0.01, None, torch.device("cpu"))
    uncached = trial_state(replace(CONFIG, uncached=True), 0.01, initial_state, torch.device("cpu"))
    assert isinstance(cached.model, torch.nn.Linear) and isinstance(uncached.model, HeadOnFrozenBackbone)
    features = backbone_features(initial_state, CONFIG.image_size, images)
    assert features.shape == (48, 512)
    val_cached = fit(cached, CONFIG.train_settings(0.01), features, labels, train_index, val_index)
    val_uncached = fit(uncached, CONFIG.train_settings(0.01), images, labels, train_index, val_index)
    torch.testing.assert_close(cached.model.weight, uncached.model.head.weight, rtol=1e-4, atol=1e-5)
    assert math.isclose(val_cached.loss, val_uncached.loss, rel_tol=1e-4)
    # the frozen backbone neither learned nor moved its batch-norm statistics
    whole = full_model(replace(CONFIG, uncached=True), initial_state, uncached.model)
    for key, value in initial_state.items():
        if not key.startswith("net.fc."):
            assert torch.equal(whole.state_dict()[key], value), key


def test_unfrozen_trial_trains_the_backbone_at_its_own_rate(initial_state):
    config = replace(CONFIG, freeze_backbone=False, backbone_lr=1e-4)
    state = trial_state(config, 0.05, initial_state, torch.device("cpu"))
    assert isinstance(state.model, MnistResNet)
    assert [group["lr"] for group in state.optimizer.param_groups] == [1e-4, 0.05]
    images, labels = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    fit(state, config.train_settings(0.05), images, labels, torch.arange(16), torch.arange(16))
    conv = "net.conv1.weight"
    assert not torch.equal(state.model.state_dict()[conv], initial_state[conv])


def _record(trial_id: str, lr: float, accuracies: list[float], status: str = "TERMINATED") -> TrialRecord:
    history = [
        {"epoch": i + 1, "val_accuracy": a, "val_loss": 1 - a, "train_seconds": 0.5 * (i + 1)}
        for i, a in enumerate(accuracies)
    ]
    return TrialRecord(trial_id, lr, status, 1, history, "boom" if status == "ERROR" else None)


def test_trial_table_marks_early_stops_failures_and_the_best_rate():
    records = [
        _record("a", 1e-2, [0.5, 0.7, 0.9]),
        _record("b", 1e-4, [0.2]),
        _record("c", 1e-3, [0.6, 0.95, 0.93]),
        _record("d", 1e-1, [], status="ERROR"),
        _record("e", 3e-2, [0.4], status="PAUSED"),
    ]
    table = trial_table(records, epochs=3).set_index("trial")
    assert list(table.index) == ["b", "c", "a", "e", "d"]  # by learning rate
    assert table.loc["b", "stopped_early"] and not table.loc["a", "stopped_early"]
    assert not table.loc["e", "stopped_early"]  # interrupted, not stopped
    assert table.loc[["a", "d", "e"], "status"].tolist() == ["done", "failed", "unfinished"]
    assert table.loc["c", "best_val_accuracy"] == 0.95 and table.loc["c", "seconds"] == 1.5
    assert best_row(table.reset_index(), "val_accuracy")["trial"] == "c"
    assert best_row(table.reset_index(), "val_loss")["trial"] == "c"
    assert best_row(trial_table([_record("d", 0.1, [], "ERROR")], 3), "val_accuracy") is None


def test_a_sweep_whose_every_trial_failed_writes_its_table_and_no_plot(tmp_path):
    records = [_record("a", 1e-2, [], status="ERROR"), _record("b", 1e-3, [], status="ERROR")]
    trials, best, complete, failures = _write_results(tmp_path, SweepConfig(trials=2, epochs=3), records)
    assert best is None and complete and sorted(failures) == ["trial a: boom", "trial b: boom"]
    assert (tmp_path / TRIALS_FILE).is_file() and not (tmp_path / PLOT_FILE).exists()


@pytest.mark.parametrize(
    ("change", "option"),
    [
        ({"lr_min": 0.1, "lr_max": 0.1}, "--lr-min"),
        ({"lr_min": 0.2, "lr_max": 0.1}, "--lr-min"),
        ({"lr_min": 0.0}, "--lr-min"),
        ({"lr_max": -1.0}, "--lr-max"),
        ({"lr_min": float("nan")}, "--lr-min"),
        ({"trials": 0}, "--trials"),
        ({"metric": "f1"}, "--metric"),
        ({"grace_period": 6}, "--grace-period"),
        ({"reduction_factor": 1.0}, "--reduction-factor"),
        ({"val_fraction": 1.0}, "--val-fraction"),
        ({"image_size": 16}, "--image-size"),
        ({"uncached": True, "freeze_backbone": False}, "--uncached"),
        ({"cv": 1}, "--cv"),
        ({"cv": 3, "freeze_backbone": False}, "--cv"),
        ({"cv": 3, "uncached": True}, "--cv"),
        ({"cluster": ClusterConfig(workers=0)}, "--workers"),
    ],
)
def test_bad_sweep_options_name_the_option(change, option):
    with pytest.raises(DistmlError) as error:
        replace(SweepConfig(), **change).validate()
    assert error.value.option == option


def test_config_round_trips_through_a_dict():
    config = SweepConfig(lr_min=1e-3, trials=3, cluster=ClusterConfig(workers=1))
    assert SweepConfig.from_dict(config.to_dict()) == config


def test_the_final_model_exports_like_finetune(tmp_path, initial_state):
    from distml.export import load_model, load_program, metadata

    model = full_model(CONFIG, initial_state, torch.nn.Linear(512, 10)).eval()
    save_model(tmp_path, model, metadata("resnet18", model, image_size=CONFIG.image_size, lr=0.01))
    images = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(load_program(tmp_path)(images), model(images))  # without distml's classes
    torch.testing.assert_close(load_model(tmp_path).model(images), model(images))
    assert load_model(tmp_path).metadata["lr"] == 0.01


# ---- --cv: a head per fold on the cached features ----

CV_CONFIG = replace(CONFIG, cv=3, epochs=2)


def cv_data() -> SplitData:
    """90 made-up feature vectors, 9 of each class, in the 3 stratified folds a --cv 3 sweep uses."""
    generator = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 9)
    features = generator.normal(size=(90, 512)).astype(np.float32)
    features[np.arange(90), labels] += 2.0  # a little signal to learn
    return SplitData(features, labels, fold_assignment(labels, CV_CONFIG.cv, CV_CONFIG.seed))


def cv_splits(data: SplitData) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [tuple(torch.from_numpy(part) for part in data.indices(fold)) for fold in sweep_splits(CV_CONFIG, data)]


def cv_heads(count: int, lr: float = 0.01) -> list:
    return [trial_state(CV_CONFIG, lr, None, torch.device("cpu")) for _ in range(count)]


def test_a_cv_trial_reports_the_mean_of_k_separately_trained_heads():
    data = cv_data()
    inputs, labels = torch.from_numpy(data.inputs), torch.from_numpy(data.labels)
    splits = cv_splits(data)
    assert sweep_splits(CV_CONFIG, data) == [0, 1, 2] and sweep_splits(CONFIG, data) == [1]
    settings = CV_CONFIG.train_settings(0.01)
    heads = cv_heads(3)
    reported = [sweep_epoch(heads, settings, inputs, labels, splits, epoch) for epoch in (1, 2)]

    alone = cv_heads(3)  # the same heads trained one after another, each for all its epochs at once
    scores = [fit(head, settings, inputs, labels, *split) for head, split in zip(alone, splits, strict=True)]
    for head, single in zip(heads, alone, strict=True):
        torch.testing.assert_close(head.model.weight, single.model.weight)
    last = reported[-1]
    accuracies, losses = [s.accuracy for s in scores], [s.loss for s in scores]
    assert last["epoch"] == 2
    assert last["val_accuracy"] == pytest.approx(np.mean(accuracies))
    assert last["val_loss"] == pytest.approx(np.mean(losses))
    assert last["std_val_loss"] == pytest.approx(np.std(losses, ddof=1))
    sizes = (np.mean([len(t) for t, _ in splits]), np.mean([len(v) for _, v in splits]))
    _, low, high = corrected_interval(losses, *sizes)
    assert (last["ci_low_val_loss"], last["ci_high_val_loss"]) == pytest.approx((low, high))
    assert low < last["val_loss"] < high
    rows = json.loads(last[FOLDS_KEY])
    assert [(r["fold"], r["epoch"]) for r in rows] == [(0, 2), (1, 2), (2, 2)]
    assert [r["val_accuracy"] for r in rows] == pytest.approx(accuracies)


def test_a_cv_checkpoint_holds_every_head_and_carries_on_from_its_epoch():
    data = cv_data()
    inputs, labels = torch.from_numpy(data.inputs), torch.from_numpy(data.labels)
    splits, settings = cv_splits(data), CV_CONFIG.train_settings(0.01)
    straight = cv_heads(3)
    for epoch in (1, 2):
        expected = sweep_epoch(straight, settings, inputs, labels, splits, epoch)
    interrupted = cv_heads(3)
    sweep_epoch(interrupted, settings, inputs, labels, splits, 1)
    saved = FoldStates(interrupted).state_dict()
    assert len(saved["folds"]) == 3
    resumed = FoldStates(cv_heads(3))
    resumed.load_state_dict(saved)
    assert resumed.epochs_done == 1
    again = sweep_epoch(resumed.states, settings, inputs, labels, splits, 2)
    scores = ("train_loss", "val_loss", "val_accuracy")
    rows_again, rows_expected = json.loads(again[FOLDS_KEY]), json.loads(expected[FOLDS_KEY])
    assert [[r[key] for key in scores] for r in rows_again] == [[r[key] for key in scores] for r in rows_expected]
    for head, single in zip(resumed.states, straight, strict=True):
        torch.testing.assert_close(head.model.weight, single.model.weight)


def test_a_fold_that_diverges_makes_the_trial_diverge_and_is_named():
    data = cv_data()
    data.inputs[int(data.indices(2)[1][0])] = np.nan  # in fold 2's validation part, so in fold 0's training part
    inputs, labels = torch.from_numpy(data.inputs), torch.from_numpy(data.labels)
    with pytest.raises(Diverged, match=r"^fold 0: diverged at epoch 1"):
        sweep_epoch(cv_heads(3, lr=0.1), CV_CONFIG.train_settings(0.1), inputs, labels, cv_splits(data), 1)


def _cv_record(trial_id: str, lr: float, accuracies: list[float]) -> TrialRecord:
    history = [
        {
            "epoch": i + 1,
            "val_accuracy": a,
            "val_loss": 1 - a,
            "train_seconds": 1.0,
            "std_val_accuracy": 0.01 * (i + 1),
            "ci_low_val_accuracy": a - 0.1,
            "ci_high_val_accuracy": a + 0.1,
            "std_val_loss": 0.02 * (i + 1),
            "ci_low_val_loss": 0.9 - a,
            "ci_high_val_loss": 1.1 - a,
        }
        for i, a in enumerate(accuracies)
    ]
    folds = [{"fold": f, "epoch": h["epoch"], "val_accuracy": h["val_accuracy"]} for h in history for f in range(3)]
    return TrialRecord(trial_id, lr, "TERMINATED", 1, history, None, folds=folds)


def test_cv_tables_give_each_scores_spread_at_its_best_epoch(tmp_path):
    records = [_cv_record("a", 1e-2, [0.5, 0.8, 0.7]), _cv_record("b", 1e-3, [0.6])]
    table = trial_table(records, epochs=3, cv=3).set_index("trial")
    assert table.loc["a", "best_val_accuracy"] == 0.8 and table.loc["a", "std_val_accuracy"] == 0.02
    assert table.loc["a", "corrected_ci95_low_val_accuracy"] == pytest.approx(0.7)
    assert table.loc["a", "corrected_ci95_high_val_loss"] == pytest.approx(0.3)
    assert "std_val_accuracy" not in trial_table(records, epochs=3)  # without --cv, the holdout's columns only
    assert history_table(records, cv=3)["corrected_ci95_low_val_loss"].notna().all()

    config = SweepConfig(trials=2, epochs=3, cv=3)
    trials, best, complete, _ = _write_results(tmp_path, config, records)
    assert complete and best["trial"] == "a" and best["cv"] == 3
    assert (best["std"], best["corrected_ci95_low"]) == pytest.approx((0.02, 0.7))
    assert json.loads((tmp_path / BEST_FILE).read_text())["corrected_ci95_high"] == pytest.approx(0.9)
    assert len(pd.read_csv(tmp_path / TRIAL_FOLDS_FILE)) == 3 * 3 + 3
