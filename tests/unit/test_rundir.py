"""RunDir.resumed: the one place kfold, sweep and finetune read a run's options back for --resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from distml.config import KFoldConfig, SweepConfig
from distml.errors import DistmlError
from distml.finetune import FinetuneConfig
from distml.rundir import RunDir


@pytest.mark.parametrize(
    ("command", "config"),
    [
        ("kfold", KFoldConfig(k=3, epochs=2, out=Path("results/kfold-x"))),
        ("sweep", SweepConfig(trials=3, out=Path("elsewhere"))),
        ("finetune", FinetuneConfig(weights="none", epochs=4, limit=200, out=Path("results/finetune-x"))),
    ],
)
def test_resumed_reads_the_saved_options_back_with_out_where_the_folder_is_now(command, config, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"command": command, "options": config.to_dict()}))
    run, resumed, saved = RunDir.resumed(tmp_path, command, type(config))
    assert run.path == tmp_path.absolute() and saved["command"] == command
    assert resumed == dataclasses.replace(config, out=tmp_path.absolute())


def test_resumed_refuses_another_commands_run(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"command": "sweep", "options": SweepConfig().to_dict()}))
    with pytest.raises(DistmlError, match="holds a sweep run, not a finetune run") as error:
        RunDir.resumed(tmp_path, "finetune", FinetuneConfig)
    assert error.value.option == "--resume"
