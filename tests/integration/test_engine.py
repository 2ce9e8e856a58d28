"""The engine opened: any model, any in-memory dataset, from Python and from the CLI, on one local Ray for the module
(the session's `local_ray`: the API and the CLI use a Ray that is already up and leave it running).

Data: scikit-learn's `load_digits` (1,797 real 8x8 images of digits), PNGs the tests write, a CSV with string labels.
"""

from __future__ import annotations

import json
import shutil
import textwrap

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits, load_iris
from sklearn.model_selection import StratifiedKFold
from typer.testing import CliRunner

import distml
from distml.cli import app

pytestmark = pytest.mark.integration

FACTORY = textwrap.dedent(
    """
    from torch import nn


    def build(num_classes, input_shape, hidden=32):
        features = 1
        for side in input_shape:
            features *= side
        return nn.Sequential(nn.Flatten(), nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    """
)


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    return data.images.astype(np.float32) / 16.0, data.target  # (1797, 8, 8) in [0, 1], labels 0..9


@pytest.fixture(scope="module")
def mynets(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "mynets.py"
    path.write_text(FACTORY)
    return path


class SmallNet:
    """A user's factory as a plain callable (not importable by a run folder)."""

    def __call__(self, num_classes, input_shape):
        import torch.nn as nn

        return nn.Sequential(
            nn.Flatten(), nn.Linear(int(np.prod(input_shape)), 24), nn.ReLU(), nn.Linear(24, num_classes)
        )


def test_cross_validate_a_callable_on_digits_arrays_scores_well_above_chance_with_scikit_learns_folds(
    local_ray, digits, tmp_path
):
    images, labels = digits
    result = distml.cross_validate(SmallNet(), (images, labels), k=3, epochs=8, lr=3e-3, seed=5, out=tmp_path / "run")
    assert result.folds["fold"].tolist() == [0, 1, 2] and result.complete and not result.failures
    assert (result.folds["val_accuracy"] > 0.85).all()  # chance is 0.10
    assert result.folds["val_size"].sum() == 1797
    assert result.classes == list(range(10))
    splits = StratifiedKFold(3, shuffle=True, random_state=5).split(np.zeros(len(labels)), labels)
    for fold, (_, val_index) in enumerate(splits):
        np.testing.assert_array_equal(np.flatnonzero(result.fold_assignment == fold), np.sort(val_index))
    summary = result.summary.set_index("metric")
    assert summary.loc["val_accuracy", "mean"] == pytest.approx(result.folds["val_accuracy"].mean())
    assert len(result.history) == 3 * 8
    header = json.loads((result.run_dir / "config.json").read_text())
    assert header["options"]["model"].startswith("callable ") and header["resumable"] is False
    assert header["dataset"]["examples"] == 1797 and header["dataset"]["input_shape"] == [1, 8, 8]
    # a bare callable cannot be rebuilt from the folder: its resume is refused in one line
    refused = CliRunner().invoke(app, ["kfold", "--resume", str(result.run_dir)])
    assert refused.exit_code == 2 and "given as a Python callable" in refused.stderr


def test_cross_validate_with_ray_already_up_twice_in_a_row_keeps_nothing_and_leaves_ray_running(local_ray, digits):
    images, labels = digits
    tabular = images.reshape(len(images), -1)
    first = distml.cross_validate("mlp", (tabular, labels), k=2, epochs=6, lr=3e-3, seed=1)
    second = distml.cross_validate("mlp", (tabular, labels), k=2, epochs=6, lr=3e-3, seed=1)
    assert local_ray.is_initialized()  # the notebook's Ray is left as it was
    assert first.run_dir is None and second.run_dir is None  # out=None: nothing kept
    pd.testing.assert_frame_equal(
        first.folds[["fold", "val_accuracy", "val_loss"]], second.folds[["fold", "val_accuracy", "val_loss"]]
    )  # the same seed gives the same folds, weights and shuffling
    assert (first.folds["val_accuracy"] > 0.85).all()


def write_pngs(folder, images: np.ndarray, labels: np.ndarray, names: list[str]) -> None:
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        target = folder / names[label]
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255).astype(np.uint8)).resize((16, 16)).save(target / f"{i:04d}.png")


def test_cli_kfold_of_a_file_model_on_an_imagefolder_of_pngs_exports_nothing_and_scores_above_chance(
    local_ray, digits, mynets, tmp_path
):
    images, labels = digits
    keep = np.isin(labels, [0, 1, 7])
    write_pngs(tmp_path / "photos", images[keep], labels[keep], {0: "zero", 1: "one", 7: "seven"})
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "kfold",
            *("--model", f"{mynets}:build", "--model-arg", "hidden=48"),
            *("--data", f"imagefolder:{tmp_path / 'photos'}", "--k", "3", "--epochs", "6", "--out", str(out)),
        ],
    )
    assert result.exit_code == 0, result.output
    folds = pd.read_csv(out / "folds.csv")
    assert folds["fold"].tolist() == [0, 1, 2] and (folds["val_accuracy"] > 0.8).all()  # chance is 1/3
    header = json.loads((out / "config.json").read_text())
    assert header["classes"] == ["one", "seven", "zero"]
    assert header["options"]["model_kwargs"] == {"hidden": 48}
    assert header["dataset"]["input_shape"] == [1, 16, 16] and header["dataset"]["examples"] == int(keep.sum())
    assert header["parameters"] == 16 * 16 * 48 + 48 + 48 * 3 + 3  # the factory got hidden=48 and 3 classes


def test_cli_resume_of_an_import_string_model_retrains_only_the_missing_folds(local_ray, digits, mynets, tmp_path):
    images, labels = digits
    np.savez(tmp_path / "digits.npz", x=images, y=labels)
    out = tmp_path / "run"
    args = ["--model", f"{mynets}:build", "--data", f"npz:{tmp_path / 'digits.npz'}", "--k", "3", "--epochs", "3"]
    assert CliRunner().invoke(app, ["kfold", *args, "--out", str(out)]).exit_code == 0
    before = pd.read_csv(out / "folds.csv")
    (out / "folds" / "fold_2.json").unlink()  # as if the run had stopped before fold 2 finished
    (out / "folds.csv").unlink()
    shutil.rmtree(out / "ray" / "folds")
    result = CliRunner().invoke(app, ["kfold", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert "running folds [2] of 3" in result.output
    after = pd.read_csv(out / "folds.csv")
    assert after["fold"].tolist() == [0, 1, 2]
    pd.testing.assert_series_equal(after["val_accuracy"][:2], before["val_accuracy"][:2])  # kept, not retrained
    assert after["val_accuracy"][2] == pytest.approx(before["val_accuracy"][2])  # the same fold, rebuilt the same


def test_cli_train_on_a_csv_with_string_labels_and_a_test_set_exports_a_model_that_predicts_names(tmp_path):
    iris = load_iris(as_frame=True)
    frame = iris.frame.rename(columns={"target": "species"})
    frame["species"] = np.array(iris.target_names)[iris.target]
    shuffled = frame.sample(frac=1.0, random_state=0)
    shuffled[:120].to_csv(tmp_path / "train.csv", index=False)
    shuffled[120:].to_csv(tmp_path / "test.csv", index=False)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            *("--data", f"csv:{tmp_path / 'train.csv'}", "--target", "species"),
            *("--test-data", f"csv:{tmp_path / 'test.csv'}", "--epochs", "60", "--batch-size", "16"),
            *("--lr", "0.01", "--out", str(out)),
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["test_images"] == 30 and metrics["accuracy"] > 0.8  # chance is 1/3
    per_class = pd.read_csv(out / "per_class.csv")
    assert per_class["class"].tolist() == ["setosa", "versicolor", "virginica"]
    model = distml.load_model(out)  # carries its normalisation: raw features in, logits out
    predictions = distml.predict(out, f"csv:{tmp_path / 'test.csv'}", target="species")
    assert len(predictions) == 30 and set(predictions["predicted"]) <= {"setosa", "versicolor", "virginica"}
    truth = shuffled[120:]["species"].to_numpy()
    assert (predictions["predicted"].to_numpy() == truth).mean() == pytest.approx(metrics["accuracy"])
    import torch

    with torch.no_grad():
        logits = model(torch.tensor(shuffled[120:].drop(columns="species").to_numpy(), dtype=torch.float32))
    assert logits.shape == (30, 3)


def sgd_with_momentum(params, lr):
    import torch

    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def smoothed_cross_entropy():
    import torch.nn as nn

    return nn.CrossEntropyLoss(label_smoothing=0.05)


def test_cross_validate_with_a_users_loss_and_optimizer_trains_each_fold_with_them(local_ray, digits, tmp_path):
    images, labels = digits
    result = distml.cross_validate(
        "mlp",
        (images, labels),
        k=2,
        epochs=6,
        lr=0.05,
        seed=2,
        loss=smoothed_cross_entropy,
        optimizer=sgd_with_momentum,
        out=tmp_path / "run",
    )
    assert (result.folds["val_accuracy"] > 0.85).all()
    header = json.loads((result.run_dir / "config.json").read_text())
    assert header["options"]["optimizer"].endswith("sgd_with_momentum")
    assert header["options"]["loss"].endswith("smoothed_cross_entropy") and header["resumable"] is False
    # the stacked MLP path is Adam on cross-entropy: these folds trained one at a time, each with its own timer
    assert result.folds["train_seconds"].nunique() == 2
    refused = CliRunner().invoke(app, ["kfold", "--resume", str(result.run_dir)])
    assert refused.exit_code == 2 and "loss and optimizer were given as a Python callable" in refused.stderr
