"""distml train, finetune, predict and compare through Typer's CliRunner: real files, real numbers, bad input."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pandas as pd
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from distml.cli import app
from distml.data import IMAGE_MAGIC, LABEL_MAGIC, read_idx

runner = CliRunner()


def _one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("command", ["train", "finetune", "compare", "predict", "pipeline"])
def test_every_option_has_help(command):
    click_command = typer.main.get_command(app).commands[command]
    assert click_command.help
    for param in click_command.params:
        assert param.help, f"{command} {param.name} has no help text"
    assert runner.invoke(app, [command, "--help"]).exit_code == 0


@pytest.fixture(scope="module")
def trained_mlp(tmp_path_factory, sample_dir):
    out = tmp_path_factory.mktemp("runs") / "train-mlp"
    args = ["train", "--data-dir", str(sample_dir), "--limit", "1200", "--epochs", "2", "--out", str(out)]
    result = runner.invoke(app, args, env={"DISTML_OFFLINE": "1"})
    assert result.exit_code == 0, result.output
    return out, result


def test_train_writes_curves_test_evaluation_and_model(trained_mlp, sample_dir):
    out, result = trained_mlp
    assert "mlp: epoch 2/2" in result.stderr
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    assert history["val_accuracy"].iloc[-1] > 0.6  # 1,080 images, 2 epochs: well above chance
    for name in ("learning_curves.png", "confusion_matrix.png", "model/model.pt", "model/model.pt2"):
        assert (out / name).stat().st_size > 1000
    config = json.loads((out / "config.json").read_text())
    assert config["command"] == "train" and config["options"]["val_fraction"] == 0.1
    assert json.loads((out / "results.json").read_text())["attempts"] == 1
    labels = read_idx(sample_dir / "t10k-labels-idx1-ubyte.gz", LABEL_MAGIC)
    confusion = pd.read_csv(out / "confusion_matrix.csv").to_numpy()
    assert confusion.sum() == 1000
    assert confusion.sum(axis=1).tolist() == np.bincount(labels).tolist()
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(np.trace(confusion) / 1000)
    per_class = pd.read_csv(out / "per_class.csv")
    assert per_class["support"].sum() == 1000 and per_class["f1"].mean() == pytest.approx(metrics["f1"])
    assert f"test accuracy {metrics['accuracy']:.4f}" in result.stdout


def test_predict_on_the_test_images_matches_the_evaluation(trained_mlp, sample_dir, tmp_path):
    out, _ = trained_mlp
    images, labels = sample_dir / "t10k-images-idx3-ubyte.gz", sample_dir / "t10k-labels-idx1-ubyte.gz"
    args = ["predict", str(out / "model"), str(images), "--labels", str(labels), "--out", str(tmp_path / "p.csv")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    accuracy = json.loads((out / "test_metrics.json").read_text())["accuracy"]
    assert f"1000 images, accuracy {accuracy:.4f}" in result.stdout
    predictions = pd.read_csv(tmp_path / "p.csv")
    assert (predictions["predicted"] == predictions["label"]).mean() == pytest.approx(accuracy)


def test_predict_a_png_prints_class_and_probability(trained_mlp, sample_dir, tmp_path):
    out, _ = trained_mlp
    pixels = read_idx(sample_dir / "t10k-images-idx3-ubyte.gz", IMAGE_MAGIC)[0]
    Image.fromarray(pixels).save(tmp_path / "digit.png")
    result = runner.invoke(app, ["predict", str(out), str(tmp_path / "digit.png")])
    assert result.exit_code == 0, result.output
    line = result.stdout.splitlines()[0]
    assert line.startswith("digit.png: ") and " p=" in line
    assert 0.1 <= float(line.split("p=")[1]) <= 1.0


def test_predict_bad_inputs(trained_mlp, tmp_path):
    out, _ = trained_mlp
    (tmp_path / "photo.jpg").write_text("not a jpeg")
    _one_line_error(runner.invoke(app, ["predict", str(out), str(tmp_path / "photo.jpg")]), "not a readable image")
    _one_line_error(runner.invoke(app, ["predict", str(tmp_path), str(tmp_path / "photo.jpg")]), "no distml model")


def test_predict_refuses_folders_bombs_empty_or_oversized_idx_and_foreign_labels(trained_mlp, tmp_path):
    import struct

    from PIL import Image

    out, _ = trained_mlp

    def predict(*args: str):
        return runner.invoke(app, ["predict", str(out), *args])

    _one_line_error(predict(str(tmp_path)), "is a folder: give image files")
    Image.new("L", (8000, 6000)).save(tmp_path / "huge.png")  # 48 M pixels: decoded, 48 MB of grey for one digit
    _one_line_error(predict(str(tmp_path / "huge.png")), "8000x6000 pixels, more than a digit needs")
    Image.new("L", (15000, 15000)).save(tmp_path / "bomb.png")  # past PIL's own decompression-bomb limit
    _one_line_error(predict(str(tmp_path / "bomb.png")), "not a readable image (DecompressionBombError)")
    (tmp_path / "empty-idx3-ubyte").write_bytes(struct.pack(">IIII", IMAGE_MAGIC, 0, 28, 28))
    _one_line_error(predict(str(tmp_path / "empty-idx3-ubyte")), "holds no images")
    (tmp_path / "huge-idx3-ubyte").write_bytes(struct.pack(">IIII", IMAGE_MAGIC, 10**9, 28, 28) + bytes(784))
    _one_line_error(predict(str(tmp_path / "huge-idx3-ubyte")), "more than distml reads")
    (tmp_path / "one-idx3-ubyte").write_bytes(struct.pack(">IIII", IMAGE_MAGIC, 1, 28, 28) + bytes(784))
    (tmp_path / "labels-idx1-ubyte").write_bytes(struct.pack(">II", LABEL_MAGIC, 1) + bytes([42]))
    result = predict(str(tmp_path / "one-idx3-ubyte"), "--labels", str(tmp_path / "labels-idx1-ubyte"))
    _one_line_error(result, "--labels:", "label 42, but the model has 10 classes")


def test_compare_a_finished_run_and_reject_other_folders(trained_mlp, tmp_path):
    out, _ = trained_mlp
    result = runner.invoke(app, ["compare", str(out), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    assert table["model"].tolist() == ["mlp"] and table["parameters"].tolist() == [109_386]
    assert (tmp_path / "cmp" / "comparison.png").is_file()
    _one_line_error(runner.invoke(app, ["compare", str(tmp_path)]), "holds no distml run")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["train", "--val-fraction", "1.5"], ["--val-fraction: must be between 0 and 1"]),
        (["train", "--model", "vit"], ["--model: unknown model 'vit'"]),
        (["train", "--epochs", "0"], ["--epochs: must be at least 1"]),
        (["finetune", "--image-size", "16", "--weights", "none"], ["--image-size: must be between 32 and 512"]),
        (["finetune", "--workers", "0", "--weights", "none"], ["--workers: must be at least 1"]),
    ],
)
def test_bad_options_are_one_line_errors(args, fragments, tmp_path):
    _one_line_error(runner.invoke(app, [*args, "--out", str(tmp_path / "run")]), *fragments)
    assert not (tmp_path / "run").exists()


def test_finetune_bad_weights_files(tmp_path):
    out = ["--out", str(tmp_path / "run")]
    missing = runner.invoke(app, ["finetune", "--weights", str(tmp_path / "nope.pt"), *out])
    _one_line_error(missing, "--weights", "nope.pt is not a file")
    (tmp_path / "garbage.pt").write_bytes(np.random.default_rng(0).bytes(300))
    garbage = runner.invoke(app, ["finetune", "--weights", str(tmp_path / "garbage.pt"), *out])
    _one_line_error(garbage, "--weights", "is not a PyTorch weights file")
    assert not (tmp_path / "run").exists()


def test_finetune_imagenet_offline_says_where_the_file_goes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache
    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")  # nothing listens: offline even where the net is up
    # urlopen builds its opener, with the proxies of that moment, on its first call and keeps it: this test's own
    # is dropped after it, or every later urlopen in the session would go through the dead proxy
    monkeypatch.setattr(urllib.request, "_opener", None)
    result = runner.invoke(app, ["finetune", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: --weights: cannot load the ImageNet weights of ResNet18")
    expected_file = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected_file) in error and "--weights PATH" in error and "--weights none" in error


def test_finetune_resume_bad_folders_are_one_line_errors(trained_mlp, tmp_path):
    """Missing folder, a folder without a run, a run of another command, a corrupt config: no Ray starts."""
    out, _ = trained_mlp
    resume = ["finetune", "--resume"]
    _one_line_error(runner.invoke(app, [*resume, str(tmp_path / "nope")]), "--resume:", "holds no distml run")
    _one_line_error(runner.invoke(app, [*resume, str(tmp_path)]), "--resume:", "holds no distml run")
    _one_line_error(runner.invoke(app, [*resume, str(out)]), "--resume:", "holds a train run, not a finetune run")
    sweep_resume = runner.invoke(app, ["finetune", "--sweep", "--resume", str(out)])  # --sweep resumes a sweep
    _one_line_error(sweep_resume, "--resume:", "holds a train run, not a sweep run")
    (tmp_path / "config.json").write_text("{not json")
    _one_line_error(runner.invoke(app, [*resume, str(tmp_path)]), "--resume:", "config.json is unreadable or corrupt")
    (tmp_path / "config.json").write_text(json.dumps({"command": "finetune"}))
    _one_line_error(runner.invoke(app, [*resume, str(tmp_path)]), "--resume:", "is not a finetune run's config")
