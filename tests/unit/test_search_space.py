"""The `--param NAME=DIST:ARGS` parser and the split of a trial's values: plain Python, no Ray."""

from __future__ import annotations

import pytest

from distml.config import TuneConfig
from distml.errors import DistmlError
from distml.search_space import (
    Param,
    model_params,
    parse_param,
    parse_space,
    space_params,
    trial_training,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lr=loguniform:1e-4:1e-1", Param("lr", "loguniform", 1e-4, 1e-1)),
        ("dropout=uniform:0:0.5", Param("dropout", "uniform", 0.0, 0.5)),
        ("batch_size=randint:16:128", Param("batch_size", "randint", 16, 128)),
        ("hidden=choice:64,256", Param("hidden", "choice", values=(64, 256))),
        ("hidden=choice:[64,32],[128]", Param("hidden", "choice", values=([64, 32], [128]))),
        ("act=choice:relu,gelu", Param("act", "choice", values=("relu", "gelu"))),
        ("flag=choice:true,false,null", Param("flag", "choice", values=(True, False, None))),
        ("mixed=choice:1,two,0.5", Param("mixed", "choice", values=(1, "two", 0.5))),
        (" lr = loguniform:1e-3:1e-2", Param("lr", "loguniform", 1e-3, 1e-2)),
        ("epochs=randint:2:2", Param("epochs", "randint", 2, 2)),  # HIGH inclusive: one value
    ],
)
def test_each_distribution_parses(text, expected):
    assert parse_param(text) == expected


@pytest.mark.parametrize(
    "text",
    ["lr=loguniform:1e-4:1e-1", "batch_size=randint:16:128", "hidden=choice:[64,32],[128]", "act=choice:relu,gelu"],
)
def test_a_parameter_spec_parses_back_to_itself(text):
    param = parse_param(text)
    assert parse_param(f"{param.name}={param.spec}") == param


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lr=normal:0:1", "unknown distribution 'normal'"),
        ("lr", "is not NAME=DIST:ARGS"),
        ("2lr=uniform:0:1", "is not NAME=DIST:ARGS"),
        ("=uniform:0:1", "is not NAME=DIST:ARGS"),
        ("lr=loguniform:1e-4", "is malformed; write loguniform:LOW:HIGH"),
        ("lr=loguniform:1e-4:1e-2:1", "is malformed"),
        ("lr=uniform:a:b", "LOW and HIGH must be numbers"),
        ("batch_size=randint:1.5:8", "LOW and HIGH must be integers"),
        ("lr=loguniform:1e-1:1e-4", "LOW (0.1) must be below HIGH (0.0001)"),
        ("dropout=uniform:0.5:0.5", "must be below HIGH"),
        ("batch_size=randint:64:16", "must be below HIGH"),
        ("lr=loguniform:0:1e-2", "log-uniform bounds must be positive"),
        ("scale=loguniform:-1:1", "log-uniform bounds must be positive"),
        ("lr=uniform:nan:1", "must be finite"),
        ("hidden=choice:", "choice needs at least one value"),
        ("lr=uniform:0:0.1", "lr takes numbers positive"),
        ("lr=choice:fast,slow", "lr takes numbers positive"),
        ("epochs=uniform:1:3", "epochs takes whole numbers"),
        ("batch_size=randint:0:64", "batch_size takes whole numbers"),
        ("weight_decay=uniform:-1:0", "weight_decay takes numbers zero or more"),
    ],
)
def test_bad_parameters_are_one_line_naming_the_option(text, message):
    with pytest.raises(DistmlError) as caught:
        parse_param(text)
    assert caught.value.option == "--param"
    assert message in caught.value.message
    assert "\n" not in str(caught.value)


def test_a_repeated_name_is_refused():
    with pytest.raises(DistmlError, match="lr is given twice"):
        parse_space(["lr=loguniform:1e-4:1e-1", "hidden=choice:16,64", "lr=uniform:0.1:0.2"])


def test_the_space_keeps_its_order_and_splits_training_from_model_keywords():
    space = parse_space(["hidden=choice:16,64", "lr=loguniform:1e-4:1e-1", "weight_decay=uniform:0:0.01"])
    assert list(space) == ["hidden", "lr", "weight_decay"]
    assert list(model_params(space_params(space))) == ["hidden"]


def test_an_empty_space_is_refused():
    with pytest.raises(DistmlError, match="at least one parameter"):
        space_params({})


def test_a_trials_values_split_into_settings_model_keywords_and_weight_decay():
    split = trial_training({"lr": 0.01, "batch_size": 32.0, "epochs": 2, "weight_decay": 1e-3, "hidden": [64, 32]})
    assert split.settings == {"lr": 0.01, "batch_size": 32, "epochs": 2}
    assert isinstance(split.settings["batch_size"], int)
    assert split.model_kwargs == {"hidden": [64, 32]}
    assert split.weight_decay == 1e-3
    assert trial_training({"hidden": 8}).weight_decay is None
    assert trial_training({"weight_decay": 0}).weight_decay is None  # the engine's Adam: folds still stack


def test_the_config_checks_its_space_and_the_grace_period_against_the_epochs_a_trial_may_run():
    TuneConfig(params={"lr": "loguniform:1e-4:1e-1"}, epochs=3, grace_period=3).validate()
    searched = TuneConfig(params={"epochs": "randint:2:6"}, epochs=3, grace_period=5)
    assert searched.max_epochs == 6
    searched.validate()
    with pytest.raises(DistmlError, match="--grace-period: must be between 1 and --epochs \\(3\\), got 4"):
        TuneConfig(params={"lr": "loguniform:1e-4:1e-1"}, epochs=3, grace_period=4).validate()
    with pytest.raises(DistmlError, match="--trials: must be at least 1"):
        TuneConfig(params={"lr": "loguniform:1e-4:1e-1"}, trials=0).validate()
    with pytest.raises(DistmlError, match="--param: lr: unknown distribution"):
        TuneConfig(params={"lr": "gauss:1:2"}).validate()
    saved = TuneConfig(params={"hidden": "choice:16,64"}, trials=3)
    assert TuneConfig.from_dict(saved.to_dict()) == saved


def test_a_searched_weight_decay_trains_with_torchs_adam_and_that_penalty():
    import torch

    from distml.search_space import adam_with_weight_decay

    optimizer = adam_with_weight_decay([torch.nn.Parameter(torch.zeros(2))], lr=0.01, weight_decay=0.001)
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["lr"] == 0.01 and optimizer.param_groups[0]["weight_decay"] == 0.001


def test_a_python_space_of_tune_distributions_becomes_the_texts_a_config_keeps():
    from ray import tune

    from distml.tune import space_specs

    specs = space_specs(
        {
            "lr": tune.loguniform(1e-4, 1e-1),
            "dropout": tune.uniform(0.0, 0.5),
            "batch_size": tune.randint(16, 129),  # Tune's HIGH is exclusive, the text's inclusive
            "hidden": tune.choice([[64, 32], [128]]),
            "act": "choice:relu,gelu",
        }
    )
    assert specs == {
        "lr": "loguniform:0.0001:0.1",
        "dropout": "uniform:0.0:0.5",
        "batch_size": "randint:16:128",
        "hidden": "choice:[64, 32],[128]",
        "act": "choice:relu,gelu",
    }
    assert parse_param(f"hidden={specs['hidden']}").values == ([64, 32], [128])
    with pytest.raises(DistmlError, match="--param: .*is not a distribution distml tunes"):
        space_specs({"lr": tune.qloguniform(1e-4, 1e-1, 1e-5)} | {"x": object()})
