"""The kfold command through Typer's CliRunner: help, and every bad input as one line with exit status 2."""

import json

import pytest
from typer.testing import CliRunner

from distml.cli import app
from distml.data import FILE_STEMS, write_idx

runner = CliRunner()


def run(*args):
    return runner.invoke(app, ["kfold", *args])


def test_help_documents_every_option():
    result = runner.invoke(app, ["kfold", "--help"])
    assert result.exit_code == 0
    for option in [
        "--k",
        "--model",
        "--epochs",
        "--batch-size",
        "--lr",
        "--seed",
        "--lr-schedule",
        "--data-dir",
        "--out",
        "--workers",
        "--cpus-per-worker",
        "--gpus-per-worker",
        "--workers-per-fold",
        "--max-failures",
        "--lost-node-grace",
        "--address",
        "--resume",
        "--quiet",
    ]:
        assert option in result.output


def test_no_arguments_shows_the_commands():
    result = runner.invoke(app, [])
    assert "kfold" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--k", "1"], "--k: must be at least 2, got 1"),
        (["--k", "700"], "--k: 700 folds but the smallest class has only 542 images"),
        (["--workers", "0"], "--workers: must be at least 1, got 0"),
        (["--epochs", "0"], "--epochs: must be at least 1, got 0"),
        (["--batch-size", "-5"], "--batch-size: must be at least 1, got -5"),
        (["--lr", "0"], "--lr: must be positive, got 0.0"),
        (["--lr", "nan"], "--lr: must be positive, got nan"),
        (["--model", "resnet99"], "--model: unknown model 'resnet99'; choose one of mlp, cnn"),
        (["--lr-schedule", "step"], "--lr-schedule: unknown schedule 'step'; choose one of constant, cosine"),
        (["--cpus-per-worker", "-1"], "--cpus-per-worker: must be positive"),
        (["--workers-per-fold", "0"], "--workers-per-fold: must be at least 1"),
        (["--lost-node-grace", "-1"], "--lost-node-grace: must be zero or more, got -1.0"),
        (["--k", "abc"], "Invalid value for '--k'"),
        (["--folds-per-trial", "0"], "--folds-per-trial: must be at least 1 or 'auto', got 0"),
        (["--folds-per-trial", "many"], "--folds-per-trial: must be a number or 'auto', got 'many'"),
        (["--folds-per-trial", "2", "--model", "cnn"], "--folds-per-trial: several folds per trial train as one"),
        (["--bogus"], "No such option: --bogus"),
        (["--seed", "-1"], "--seed: must be between 0 and 4294967295, got -1"),
        (["--seed", str(2**32)], "--seed: must be between 0 and 4294967295, got 4294967296"),
        (["--batch-size", "100000"], "--batch-size: 100000 is more than the smallest fold's"),
        (["--track", "wandb"], "--track: unknown tracker 'wandb'; choose one of mlflow, tensorboard"),
    ],
)
def test_bad_values_are_one_line_errors_with_status_2(tmp_path, sample_dir, args, message):
    out = tmp_path / "run"
    result = run("--data-dir", str(sample_dir), "--out", str(out), *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert not out.exists(), "nothing may be written for bad input"


def test_missing_and_corrupt_data(tmp_path, sample_dir):
    result = run("--data-dir", str(tmp_path / "absent"), "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and "--data-dir:" in result.stderr and "is not a folder" in result.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    for stem in FILE_STEMS.values():
        (bad / stem).write_bytes((sample_dir / f"{stem}.gz").read_bytes())  # gzip bytes under a raw name
    result = run("--data-dir", str(bad), "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and "has magic number" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for stem in FILE_STEMS.values():
        (truncated / f"{stem}.gz").write_bytes((sample_dir / f"{stem}.gz").read_bytes())
    write_idx(truncated / f"{FILE_STEMS['train_labels']}.gz", __import__("numpy").zeros(3, "uint8"))
    result = run("--data-dir", str(truncated), "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and "6000 train images but 3 labels" in result.stderr
    assert not (tmp_path / "run").exists()


def test_output_path_that_is_a_file_or_unwritable(tmp_path, sample_dir):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    result = run("--data-dir", str(sample_dir), "--out", str(a_file))
    assert result.exit_code == 2 and f"--out: {a_file} is a file, not a folder" in result.stderr
    result = run("--data-dir", str(sample_dir), "--out", str(a_file / "below"))
    assert result.exit_code == 2 and "cannot be written" in result.stderr
    assert a_file.read_text() == "x"


def test_resume_of_a_folder_without_a_run(tmp_path):
    result = run("--resume", str(tmp_path))
    assert result.exit_code == 2 and "--resume:" in result.stderr and "holds no distml run" in result.stderr


def test_unreachable_address_fails_fast(tmp_path, sample_dir):
    result = run("--data-dir", str(sample_dir), "--out", str(tmp_path / "run"), "--address", "127.0.0.1:1")
    assert result.exit_code == 2
    assert "--address: cannot reach a Ray cluster at 127.0.0.1:1" in result.stderr
    assert not (tmp_path / "run").exists()


def test_resume_with_a_fold_checkpoint_that_cannot_be_read_names_it_and_the_way_out_before_ray_starts(tmp_path):
    import sys

    import torch

    from distml.atomic import write_json
    from distml.config import KFoldConfig

    run_dir = tmp_path / "run"
    write_json(run_dir / "config.json", {"command": "kfold", "options": KFoldConfig(k=4).to_dict()})
    whole = tmp_path / "whole.pt"
    torch.save({"model": {"w": torch.randn(32, 32)}}, whole)
    group = run_dir / "ray" / "folds" / "folds-2-3"
    group.mkdir(parents=True)
    (group / "state.pt").write_bytes(whole.read_bytes()[:100])  # cut short, as a disk that filled up leaves it
    files = sorted(p for p in run_dir.rglob("*") if p.name != ".distml.lock")  # the folder's lock is its own

    result = run("--resume", str(run_dir))
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: --resume: {group / 'state.pt'} cannot be read (BadZipFile: File is not a zip file); "
        "delete it to train folds 2, 3 again from the first epoch"
    )
    assert sorted(p for p in run_dir.rglob("*") if p.name != ".distml.lock") == files  # nothing written
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()


@pytest.mark.parametrize(
    ("options", "text"),
    [
        ({"k": "five"}, "saved option 'k' is 'five'; it must be int"),
        ({"epochs": True}, "saved option 'epochs' is True; it must be int"),
        ({"lr": [0.1]}, "saved option 'lr' is [0.1]; it must be float"),
        ({"cluster": {"workers": "many"}}, "saved option 'workers' is 'many'"),
        ([1, 2], "is not a kfold run's config"),
    ],
)
def test_resuming_a_hand_edited_config_with_wrong_types_is_one_line(tmp_path, options, text):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"command": "kfold", "options": options}))
    result = run("--resume", str(run_dir))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --resume: ") and text in lines[0], result.stderr
