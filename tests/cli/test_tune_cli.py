"""`distml tune` through Typer's CliRunner: its help, and bad input refused in one line with exit status 2 before
anything is written or Ray starts."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from distml.cli import app

runner = CliRunner()
SPACE = ["--param", "lr=loguniform:1e-4:1e-1"]


@pytest.fixture()
def small_npz(tmp_path):
    """60 tabular examples of 3 classes: enough for k = 3."""
    rng = np.random.default_rng(0)
    path = tmp_path / "small.npz"
    np.savez(path, x=rng.normal(size=(60, 8)).astype(np.float32), y=np.arange(60) % 3)
    return path


def test_tune_help_names_its_search_options_and_gives_an_example():
    result = runner.invoke(app, ["tune", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for option in ("--param", "--trials", "--k", "--scheduler", "--grace-period", "--reduction-factor", "--then-train"):
        assert option in result.output, option
    assert "Example: distml tune --param lr=loguniform:" in result.output


@pytest.mark.parametrize(
    ("args", "option", "text"),
    [
        (["--param", "lr=normal:0:1"], "--param", "unknown distribution 'normal'"),
        (["--param", "lr"], "--param", "is not NAME=DIST:ARGS"),
        (["--param", "lr=loguniform:1e-4"], "--param", "is malformed"),
        ([*SPACE, "--param", "lr=uniform:0.1:0.2"], "--param", "lr is given twice"),
        (["--param", "lr=loguniform:1e-1:1e-4"], "--param", "LOW (0.1) must be below HIGH (0.0001)"),
        (["--param", "lr=loguniform:0:1e-1"], "--param", "log-uniform bounds must be positive"),
        (["--param", "scale=loguniform:-2:1"], "--param", "log-uniform bounds must be positive"),
        ([], "--param", "give at least one parameter"),
        ([*SPACE, "--trials", "0"], "--trials", "must be at least 1"),
        ([*SPACE, "--epochs", "2", "--grace-period", "3"], "--grace-period", "must be between 1 and --epochs (2)"),
        ([*SPACE, "--scheduler", "hyperband"], "--scheduler", "unknown scheduler 'hyperband'"),
        ([*SPACE, "--search", "grid"], "--search", "unknown search 'grid'"),
        ([*SPACE, "--reduction-factor", "1"], "--reduction-factor", "must be above 1"),
        ([*SPACE, "--k", "1"], "--k", "must be at least 2"),
        ([*SPACE, "--outer-k", "1"], "--outer-k", "must be at least 2"),
        ([*SPACE, "--outer-k", "3", "--then-train"], "--then-train", "a nested run"),
    ],
)
def test_bad_input_is_refused_before_ray_starts(args, option, text, refused, tmp_path):
    refused(["tune", *args], tmp_path / "run", option, text)


def test_a_parameter_the_model_factory_does_not_take_is_refused_before_ray_starts(refused, small_npz, tmp_path):
    line = refused(
        ["tune", "--data", f"npz:{small_npz}", "--k", "3", *SPACE, "--param", "depth=choice:1,2"],
        tmp_path / "run",
        "--param",
        "has no parameter 'depth'",
    )
    assert "hidden" in line  # what the MLP does take


def test_a_batch_larger_than_a_folds_training_part_is_refused(refused, small_npz, tmp_path):
    refused(
        ["tune", "--data", f"npz:{small_npz}", "--k", "3", "--param", "batch_size=randint:8:64"],
        tmp_path / "run",
        "--param",
        "64 is more than the smallest fold's 40 training examples",
    )
