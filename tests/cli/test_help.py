"""Every command's --help names every one of its options (read from the command itself, not a list kept by hand),
and the options shared by the commands that run on Ray are the same on each."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from distml.cli import app

runner = CliRunner()
COMMANDS = typer.main.get_command(app).commands
RAY_COMMANDS = ("kfold", "finetune", "sweep", "tune", "pipeline")
SHARED = (
    "--workers",
    "--cpus-per-worker",
    "--gpus-per-worker",
    "--max-failures",
    "--address",
    "--storage",
    "--data-dir",
    "--out",
    "--quiet",
)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_names_every_option_and_gives_an_example(name):
    result = runner.invoke(app, [name, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    options = [opt for param in COMMANDS[name].params if not param.hidden for opt in param.opts if opt.startswith("-")]
    assert options, name
    missing = [opt for opt in options if opt not in result.output]
    assert missing == []
    assert "Example: distml " + name in result.output


@pytest.mark.parametrize("name", RAY_COMMANDS)
def test_every_command_on_ray_takes_the_shared_options_with_one_help_text(name):
    params = {opt: param for param in COMMANDS[name].params for opt in param.opts}
    assert [opt for opt in SHARED if opt not in params] == []
    reference = {opt: param for param in COMMANDS["kfold"].params for opt in param.opts}
    for opt in ("--cpus-per-worker", "--gpus-per-worker", "--max-failures", "--address", "--storage", "--data-dir"):
        assert params[opt].help == reference[opt].help, opt
    assert params["--storage"].envvar == "DISTML_STORAGE"
