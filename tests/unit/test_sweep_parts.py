"""The sweep's plain torch and pandas pieces, on tiny tensors and made-up trial records: no Ray."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from distml.config import ClusterConfig, SweepConfig
from distml.distributed.tune import TrialRecord
from distml.errors import DistmlError
from distml.export import save_model
from distml.folds import fold_indices, holdout_assignment, stratified_subset
from distml.resnet import HeadOnFrozenBackbone, MnistResNet, backbone_features, build_resnet18, full_model
from distml.resnet import sweep_state as trial_state
from distml.sweep import PLOT_FILE, TRIALS_FILE, _write_results, best_row, trial_table
from distml.train import fit

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
