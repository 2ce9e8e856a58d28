"""`distml kfold --storage`: bad values are one line and exit status 2, before any Ray starts."""

from typer.testing import CliRunner

from distml.cli import app


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
