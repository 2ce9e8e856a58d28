"""`distml kfold --storage`: bad values are one line and exit status 2, before any Ray starts, and never show the
credentials a URI holds."""

import json

from typer.testing import CliRunner

from distml.cli import app
from distml.config import KFoldConfig


def test_unknown_storage_scheme_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["kfold", "--storage", "ftp://host/runs", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --storage: ftp://host/runs: ftp:// is not storage Ray can write to; use a local or mounted path, "
        "file://, s3://, gs://, gcs://, abfs://, abfss://, hdfs://"
    ]
    assert not (tmp_path / "run").exists()


def test_absolute_out_outside_a_local_storage_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["kfold", "--storage", str(tmp_path / "st"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "--out: " in result.output and "is absolute; with a local --storage" in result.output
    assert not (tmp_path / "st").exists() and not (tmp_path / "x").exists()


def test_a_uri_with_one_slash_is_refused_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["kfold", "--storage", "s3:/bucket/runs", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --storage: s3:/bucket/runs is not a URI: write s3://BUCKET/PREFIX"
    ]
    assert not (tmp_path / "run").exists()


def test_credentials_in_a_refused_uri_are_not_printed(tmp_path):
    result = CliRunner().invoke(
        app, ["kfold", "--storage", "ftp://alice:s3cr3t@host/runs", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2
    assert (
        "s3cr3t" not in result.output and "error: --storage: ftp://alice:***@host/runs: ftp:// is not" in result.output
    )


def test_resuming_a_run_whose_storage_held_credentials_needs_them_given_again(tmp_path):
    options = KFoldConfig(k=2, storage="s3://***@bucket/runs").to_dict()
    (tmp_path / "config.json").write_text(json.dumps({"command": "kfold", "run_id": "a" * 32, "options": options}))
    result = CliRunner().invoke(app, ["kfold", "--resume", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --resume: s3://***@bucket/runs: its credentials are not kept in config.json; give the same storage "
        "again with them (set DISTML_STORAGE, or storage= from Python), or without them to use the environment's"
    ]
