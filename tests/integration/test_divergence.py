"""A loss that stops being finite: `kfold` and `train` fail in a line and exit 1, a resume trains no diverged fold
again, a sweep marks the trial and goes on; no JSON file holds a bare NaN."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from distml.cli import app
from distml.distributed.tune import TrialRecord
from distml.sweep import best_row, trial_table

integration = pytest.mark.integration


def kfold(*options: str):
    return CliRunner().invoke(app, ["kfold", *options])


def strict_json(folder: Path) -> list[Path]:
    """Every JSON file distml wrote under `folder`, each checked to parse without NaN or Infinity (bare NaN is no
    JSON). Ray Tune's own state under ray/ is left out: one of its .json files is a pickle."""

    def refuse(constant: str):
        raise AssertionError(f"bare {constant}")

    files = sorted(path for path in folder.rglob("*.json") if (folder / "ray") not in path.parents)
    for path in files:
        json.loads(path.read_text(), parse_constant=refuse)
    return files


@integration
def test_kfold_whose_every_fold_diverges_exits_1_and_a_resume_trains_none_again(local_ray, sample_dir, tmp_path):
    out = tmp_path / "run"
    result = kfold("--lr", "1e30", "--k", "2", "--epochs", "2", "--data-dir", str(sample_dir), "--out", str(out))
    assert result.exit_code == 1, result.output
    for fold in (0, 1):
        assert f"fold {fold}: diverged at epoch 1 (loss nan at lr 1e+30)" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: no fold finished; nothing to report (fold 0: diverged at epoch 1 (loss nan at lr 1e+30))"
    )
    assert not (out / "folds.csv").exists()  # nothing to report
    saved = {path.name: path.read_text() for path in (out / "folds").glob("fold_*.json")}
    assert sorted(saved) == ["fold_0.json", "fold_1.json"]
    fold = json.loads(saved["fold_1.json"])
    assert fold["diverged"] and fold["diverged_epoch"] == 1 and fold["lr"] == 1e30 and fold["epochs"] == 0
    assert fold["val_accuracy"] is None and json.loads(fold["history_json"]) == []
    assert not list((out / "folds").glob("fold_*.npz"))  # no predictions
    assert len(strict_json(out)) >= 3

    resumed = kfold("--resume", str(out))
    assert resumed.exit_code == 1, resumed.output
    assert "running folds" not in resumed.output and "no fold finished" in resumed.stderr
    assert {path.name: path.read_text() for path in (out / "folds").glob("fold_*.json")} == saved


@integration
def test_a_run_with_a_diverged_fold_reports_the_others_and_exits_1(local_ray, sample_dir, tmp_path):
    """The run a stack with one diverging fold leaves (made here from a finished run, its fold 1 replaced by a diverged
    one): resumed, it trains nothing, reports fold 0 alone and fails; resumed again, it says so again."""
    out = tmp_path / "run"
    finished = kfold("--k", "2", "--epochs", "1", "--data-dir", str(sample_dir), "--out", str(out))
    assert finished.exit_code == 0, finished.output
    fold_file = out / "folds" / "fold_1.json"
    fold = json.loads(fold_file.read_text())
    line = "fold 1: diverged at epoch 1 (loss nan at lr 0.001)"
    scores = ("val_accuracy", "val_loss", "precision_macro", "recall_macro", "f1_macro", "confusion_json")
    fold.update(dict.fromkeys(scores), epochs=0, history_json="[]", diverged=True, diverged_epoch=1, error=line)
    fold_file.write_text(json.dumps(fold))
    (out / "folds" / "fold_1.npz").unlink()
    (out / "folds.csv").unlink()

    resumed = kfold("--resume", str(out))
    assert resumed.exit_code == 1, resumed.output
    assert "running folds" not in resumed.output
    assert resumed.stderr.strip().splitlines()[-1] == f"error: {line}"
    assert pd.read_csv(out / "folds.csv")["fold"].tolist() == [0]
    assert "1/2 folds" in resumed.stdout
    strict_json(out)

    again = kfold("--resume", str(out))
    assert again.exit_code == 1 and again.stderr.strip().splitlines()[-1] == f"error: {line}", again.output


@integration
def test_a_ddp_fold_that_diverges_ends_at_once_without_a_retry(local_ray, sample_dir, tmp_path):
    """--workers-per-fold 2: the two ranks stop at the same epoch, and the fold's end is not a worker failure that
    Ray Train would restart (--max-failures 1 here): one line per fold, exit 1, a resume trains nothing."""
    out = tmp_path / "ddp"
    options = ["--lr", "1e30", "--k", "2", "--epochs", "3", "--limit", "600", "--max-failures", "1"]
    result = kfold(
        *options, "--workers", "1", "--workers-per-fold", "2", "--data-dir", str(sample_dir), "--out", str(out)
    )
    assert result.exit_code == 1, result.output
    for fold in (0, 1):
        assert f"fold {fold}: diverged at epoch 1 (loss nan at lr 1e+30)" in result.stderr
        saved = json.loads((out / "folds" / f"fold_{fold}.json").read_text())
        assert saved["diverged"] and saved["epochs"] == 0 and saved["world_size"] == 2, saved
    assert "failed" not in result.stderr.replace("no fold finished", "")  # no worker failure, no retry
    resumed = kfold("--resume", str(out))
    assert resumed.exit_code == 1 and "running folds" not in resumed.output, resumed.output


@integration
def test_a_finetune_that_diverges_exits_1_without_restarting_its_workers(local_ray, sample_dir, tmp_path):
    out = tmp_path / "finetune"
    # BatchNorm keeps a ResNet's outputs finite at absurd rates; at 1e39 its first steps take the weights past float32
    options = ["--lr", "1e39", "--epochs", "1", "--limit", "200", "--weights", "none", "--image-size", "32"]
    command = ["finetune", *options, "--workers", "1", "--max-failures", "1", "--data-dir", str(sample_dir)]
    result = CliRunner().invoke(app, [*command, "--out", str(out)])
    assert result.exit_code == 1, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: resnet18-full: diverged at epoch 1 (loss ") and last.endswith(" at lr 1e+39)")
    assert "workers failed" not in result.output
    assert not (out / "results.json").exists() and not (out / "model").exists()


@integration
def test_train_that_diverges_exits_1_in_one_line_and_exports_nothing(sample_dir, tmp_path):
    out = tmp_path / "run"
    options = ["--lr", "1e30", "--epochs", "2", "--limit", "600", "--data-dir", str(sample_dir), "--out", str(out)]
    result = CliRunner().invoke(app, ["train", *options])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines()[-1] == "error: mlp: diverged at epoch 1 (loss nan at lr 1e+30)"
    assert sorted(path.name for path in out.iterdir() if not path.name.startswith(".")) == ["config.json"]


@integration
def test_a_sweep_marks_the_trial_that_diverged_ranks_it_last_and_finishes(local_ray, sample_dir, tmp_path):
    """With seed 0 the three rates drawn are about 1e37 (its first step takes the head's logits past float32's
    range), 1e33 and 3e30 (absurd, but finite)."""
    out = tmp_path / "sweep"
    options = ["--lr-min", "1e30", "--lr-max", "1e41", "--trials", "3", "--epochs", "2", "--workers", "1"]
    data = ["--weights", "none", "--image-size", "32", "--train-images", "1000", "--data-dir", str(sample_dir)]
    result = CliRunner().invoke(app, ["sweep", *options, *data, "--out", str(out)])
    assert result.exit_code == 0, result.output
    trials = pd.read_csv(out / "trials.csv")
    diverged = trials[trials["diverged"]]
    assert len(diverged) == 1 and diverged["status"].tolist() == ["diverged"] and diverged["lr"].iloc[0] > 1e36
    assert diverged["error"].iloc[0].startswith("diverged at epoch 1 (loss nan at lr 1.0")
    assert f"trial {diverged['trial'].iloc[0]}: diverged at epoch 1" in result.stderr
    assert (trials.loc[~trials["diverged"], "status"] == "done").all()
    best = json.loads((out / "best.json").read_text())
    assert best["trial"] != diverged["trial"].iloc[0] and best["diverged"] is False
    strict_json(out)


def _record(trial_id: str, lr: float, accuracies: list[float], diverged: str | None = None) -> TrialRecord:
    history = [
        {"epoch": i + 1, "val_accuracy": a, "val_loss": 1 - a, "train_seconds": 0.5 * (i + 1)}
        for i, a in enumerate(accuracies)
    ]
    return TrialRecord(trial_id, lr, "TERMINATED", 1, history, None, diverged)


def test_a_trial_that_diverged_is_marked_and_ranked_after_every_other():
    line = "diverged at epoch 2 (loss nan at lr 10)"
    records = [_record("a", 1e-3, [0.5, 0.6]), _record("b", 10.0, [0.9], diverged=line), _record("c", 1e-2, [0.7])]
    table = trial_table(records, epochs=3).set_index("trial")
    assert table.loc["b", ["status", "diverged", "stopped_early", "epochs", "error"]].tolist() == [
        "diverged",
        True,
        False,
        1,
        line,
    ]
    assert table.loc["c", ["status", "diverged", "stopped_early"]].tolist() == ["done", False, True]
    for metric in ("val_accuracy", "val_loss"):
        assert best_row(table.reset_index(), metric)["trial"] == "c"  # b's 0.9 came before it diverged
    alone = trial_table([_record("b", 10.0, [0.9], diverged=line), _record("d", 20.0, [], diverged=line)], 3)
    assert best_row(alone, "val_accuracy")["trial"] == "b"  # last, but the only one with an epoch
