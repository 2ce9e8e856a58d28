"""RunDir.resumed: the one place kfold, sweep and finetune read a run's options back for --resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from distml.config import FinetuneConfig, KFoldConfig, SweepConfig
from distml.errors import DistmlError
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


def test_pipeline_stages_get_the_batch_size_and_the_cluster_options(tmp_path):
    from distml.config import ClusterConfig, PipelineConfig
    from distml.pipeline import stages

    cluster = ClusterConfig(address="127.0.0.1:6379", workers=3, cpus_per_worker=2, max_failures=5)
    config = PipelineConfig(batch_size=32, epochs=2, limit=500, seed=7, cluster=cluster)
    holdout, kfold, finetune = stages(config, tmp_path)
    assert (holdout.batch_size, kfold.batch_size, finetune.batch_size) == (32, 32, 32)
    assert kfold.cluster == cluster and finetune.cluster == cluster
    assert (holdout.seed, kfold.seed, finetune.seed) == (7, 7, 7)
    assert holdout.limit == kfold.limit == finetune.limit == 500 and holdout.epochs == kfold.epochs == 2


def test_json_files_hold_null_where_a_number_is_nan_or_infinite(tmp_path):
    import json
    import math

    from distml.atomic import write_json

    write_json(tmp_path / "x.json", {"loss": math.nan, "rows": [1.5, math.inf, {"low": -math.inf}], "ok": 0.25})
    text = (tmp_path / "x.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": None, "rows": [1.5, None, {"low": None}], "ok": 0.25}


def test_report_files_get_the_users_umask_not_0600(tmp_path):
    import os
    import stat

    from distml.atomic import write_text

    previous = os.umask(0o022)
    try:
        path = write_text(tmp_path / "summary.csv", "metric,mean\n")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable by colleagues on a shared disk
        os.umask(0o077)
        path = write_text(tmp_path / "private.csv", "x\n")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(previous)


def test_an_out_that_escapes_a_local_storage_root_is_refused(tmp_path):
    import pytest

    from distml.errors import DistmlError
    from distml.rundir import fresh_run_folder

    root = tmp_path / "storage"
    assert fresh_run_folder("kfold", Path("runs/a"), str(root)) == root / "runs" / "a"
    assert fresh_run_folder("kfold", Path("runs/../b"), str(root)) == root / "runs" / ".." / "b"  # still inside
    with pytest.raises(DistmlError, match="--out: ../elsewhere leads out of the --storage folder"):
        fresh_run_folder("kfold", Path("../elsewhere"), str(root))
    with pytest.raises(DistmlError, match="leads out of"):
        fresh_run_folder("kfold", Path("runs/../../elsewhere"), str(root))
