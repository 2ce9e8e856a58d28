"""`distml sweep` through Typer's CliRunner: help text and one-line errors (no Ray starts for bad input)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from distml.cli import app
from distml.data import SAMPLE_DIR

runner = CliRunner()


def test_every_sweep_option_has_help():
    result = runner.invoke(app, ["sweep", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in [
        "--lr-min",
        "--lr-max",
        "--trials",
        "--metric",
        "--grace-period",
        "--epochs",
        "--freeze-backbone",
        "--backbone-lr",
        "--weights",
        "--image-size",
        "--val-fraction",
        "--then-finetune",
        "--max-failures",
        "--resume",
        "--workers",
        "--cpus-per-worker",
        "--gpus-per-worker",
        "--address",
    ]:
        assert option in result.output, option


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr-min", "0.1", "--lr-max", "0.01"], "--lr-min: must be below --lr-max"),
        (["--lr-min", "0.01", "--lr-max", "0.01"], "--lr-min: must be below --lr-max"),
        (["--lr-min", "0"], "--lr-min: must be positive"),
        (["--lr-max", "-0.5"], "--lr-max: must be positive"),
        (["--trials", "0"], "--trials: must be at least 1"),
        (["--trials", "-3"], "--trials: must be at least 1"),
        (["--metric", "f1"], "--metric: unknown metric 'f1'"),
        (["--trials", "many"], "Invalid value for '--trials'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    result = runner.invoke(app, ["sweep", "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "run").exists()


def test_resume_of_a_folder_without_a_run_is_one_line(tmp_path):
    result = runner.invoke(app, ["sweep", "--resume", str(tmp_path)])
    assert result.exit_code == 2
    assert "--resume:" in result.output and "holds no distml run" in result.output


def test_finetune_sweep_is_the_sweep_with_finetunes_options(tmp_path):
    """`distml finetune --sweep` routes to the sweep: its own checks answer, before any Ray starts."""
    from typer.testing import CliRunner

    from distml.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["finetune", "--sweep", "--trials", "0", "--out", str(out)])
    assert result.exit_code == 2 and "--trials: must be at least 1, got 0" in result.stderr
    result = CliRunner().invoke(app, ["finetune", "--help"])
    assert "--sweep" in result.output and "--trials" in result.output
    assert not out.exists()


def test_cv_has_help():
    result = runner.invoke(app, ["sweep", "--help"], terminal_width=200)
    assert "--cv" in result.output and "K-fold" in result.output


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--cv", "1"], "must be at least 2, got 1"),
        (["--cv", "3", "--no-freeze-backbone"], "not with --no-freeze-backbone"),
        (["--cv", "3", "--uncached"], "not with --uncached"),
        (["--data-dir", str(SAMPLE_DIR), "--train-images", "100", "--cv", "20"], "20 folds but the smallest class"),
    ],
)
def test_cv_without_cached_features_or_with_too_many_folds_is_refused(args, text, refused, tmp_path):
    refused(["sweep", *args], tmp_path / "run", "--cv", text)
