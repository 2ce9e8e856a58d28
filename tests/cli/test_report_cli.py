"""`distml report RUN_DIR` through Typer's CliRunner: it rebuilds report.md and report.html from the folder's files,
says where in one line, and refuses a folder that holds no run in one line with exit status 2; `distml train` leaves
both files at its end."""

from __future__ import annotations

import base64
import json
import re

import pandas as pd
from typer.testing import CliRunner

from distml import plots
from distml.cli import app

runner = CliRunner()


def write_train_run(path, accuracy: float):
    """A finished train run's files: config.json, results.json, history.csv and its curves."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"command": "train", "options": {"model": "mlp", "epochs": 2}}))
    results = {"model": "mlp", "evaluated_on": "test", "accuracy": accuracy, "precision": 0.9, "recall": 0.9}
    results |= {"f1": 0.9, "parameters": 1000, "epochs": 2, "train_seconds": 1.0, "train_images_per_second": 10.0}
    (path / "results.json").write_text(json.dumps(results | {"predict_images_per_second": 100.0, "attempts": 1}))
    history = pd.DataFrame(
        {"epoch": [1, 2], "train_loss": [0.9, 0.5], "train_accuracy": [0.7, 0.8], "val_loss": [0.6, 0.4]}
    ).assign(val_accuracy=[0.8, 0.85], seconds=[1.0, 1.0])
    history.to_csv(path / "history.csv", index=False)
    plots.learning_curves(history, path / "learning_curves.png")
    return path


def embedded_images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)]


def test_report_rebuilds_both_files_from_the_folder(tmp_path):
    run = write_train_run(tmp_path / "train", accuracy=0.9123)
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines() == [f"report in {run / 'report.md'} and {run / 'report.html'}"]
    assert "Test accuracy **0.9123**" in (run / "report.md").read_text()
    page = (run / "report.html").read_text()
    assert embedded_images(page) == [(run / "learning_curves.png").read_bytes()]
    assert page.count("<table>") == 2  # the history, the options

    results = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**results, "accuracy": 0.9456}))
    (run / "report.html").unlink()
    result = runner.invoke(app, ["report", str(run), "-q"])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.strip().splitlines()) == 1
    assert "Test accuracy **0.9456**" in (run / "report.md").read_text()
    assert "<strong>0.9456</strong>" in (run / "report.html").read_text()


def test_a_folder_with_no_run_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    for folder in (tmp_path, tmp_path / "missing"):
        result = runner.invoke(app, ["report", str(folder)])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0] == f"error: {folder} holds no distml run (no config.json, nor the " + (
            "comparison.csv of a comparison)"
        )
        assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_train_writes_its_report_at_its_end(tmp_path, sample_dir):
    out = tmp_path / "train"
    args = ["train", "--data-dir", str(sample_dir), "--limit", "600", "--epochs", "1", "--out", str(out), "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# Holdout training: mlp") and f"**{results['accuracy']:.4f}**" in markdown
    page = (out / "report.html").read_text()
    assert embedded_images(page) == [
        (out / name).read_bytes() for name in ("learning_curves.png", "confusion_matrix.png")
    ]
