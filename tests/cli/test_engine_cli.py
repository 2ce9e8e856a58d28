"""Bad input to the engine, through the CLI: one line naming the option, exit status 2, nothing written, and no Ray
started (each refusal comes before the folds are submitted). The same errors reach Python as DistmlError."""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import distml

runner = CliRunner()

FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn


    def good(num_classes, input_shape):
        return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), num_classes))


    def raises(num_classes, input_shape):
        raise RuntimeError("out of ideas")


    def not_a_module(num_classes, input_shape):
        return "a string"


    def wrong_shape(num_classes, input_shape):
        return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), num_classes + 1))


    not_callable = 3
    """
)


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "nets.py").write_text(FACTORIES)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    y = np.repeat(["a", "b", "c"], 20)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(5)]).assign(label=y)
    frame.to_csv(tmp_path / "good.csv", index=False)
    frame.assign(f0=["text"] * 60).to_csv(tmp_path / "text.csv", index=False)
    np.savez(tmp_path / "regression.npz", x=x, y=rng.normal(size=60))
    np.savez(tmp_path / "multilabel.npz", x=x, y=rng.integers(0, 2, size=(60, 3)))
    np.savez(tmp_path / "rare.npz", x=x, y=np.array([0] * 57 + [1] * 3))
    return tmp_path


@pytest.mark.parametrize(
    ("model", "text"),
    [
        ("nowhere.py:build", "nowhere.py is not a file"),
        ("no_such_package_xyz.nets:build", "ModuleNotFoundError"),
        ("{nets}:missing", "missing"),
        ("{nets}:not_callable", "not callable"),
        ("{nets}:raises", "RuntimeError: out of ideas"),
        ("{nets}:not_a_module", "str"),
        ("{nets}:wrong_shape", "(N, num_classes)"),
        ("transformer", "unknown model"),
    ],
)
def test_a_model_that_cannot_be_built_or_gives_the_wrong_output_is_one_line(refused, files, model, text):
    model = model.format(nets=files / "nets.py")
    data = ["--data", f"csv:{files / 'good.csv'}", "--target", "label", "--k", "3"]
    refused(["kfold", "--model", model, *data], files / "run", "--model", text)


@pytest.mark.parametrize(
    ("data", "extra", "option", "text"),
    [
        ("csv:{d}/absent.csv", [], "--data", "does not exist"),
        ("parquet:{d}/good.csv", [], "--data", "unknown data kind"),
        ("csv:{d}/good.csv", ["--target", "species"], "--target", "label"),  # lists the columns there are
        ("csv:{d}/text.csv", ["--target", "label"], "--data", "f0"),
        ("npz:{d}/regression.npz", [], "--data", "regression and multi-label targets are not supported yet"),
        ("npz:{d}/multilabel.npz", [], "--data", "regression and multi-label targets are not supported yet"),
        ("npz:{d}/rare.npz", [], "--k", "3"),
    ],
)
def test_data_that_cannot_be_cross_validated_is_one_line(refused, files, data, extra, option, text):
    args = ["kfold", "--model", f"{files / 'nets.py'}:good", "--data", data.format(d=files), *extra, "--k", "5"]
    refused(args, files / "run", option, text)


def test_image_folders_with_one_class_unreadable_images_or_mixed_sizes_are_one_line(refused, files):
    from PIL import Image

    folder = files / "photos"
    (folder / "cat").mkdir(parents=True)
    for i in range(3):
        Image.new("L", (8, 8), color=i * 40).save(folder / "cat" / f"{i}.png")
    model = ["--model", f"{files / 'nets.py'}:good", "--k", "2"]
    refused(["kfold", *model, "--data", f"imagefolder:{folder}"], files / "run", "--data", "at least 2")
    (folder / "dog").mkdir()
    for i in range(3):
        Image.new("L", (8, 8), color=200 - i * 40).save(folder / "dog" / f"{i}.png")
    Image.new("L", (12, 10)).save(folder / "dog" / "big.png")
    refused(["kfold", *model, "--data", f"imagefolder:{folder}"], files / "run", "--data", "--resize")
    (folder / "dog" / "big.png").write_bytes(b"not a png at all")
    refused(["kfold", *model, "--data", f"imagefolder:{folder}"], files / "run", "--data", "big.png")


@pytest.mark.parametrize("pair", ["hidden", "=3", "2x=3", "hidden=1 hidden=2"])
def test_a_malformed_model_arg_is_one_line(refused, files, pair):
    args = [arg for part in pair.split(" ") for arg in ("--model-arg", part)]
    data = ["--data", f"csv:{files / 'good.csv'}", "--target", "label"]
    refused(["kfold", "--model", f"{files / 'nets.py'}:good", *args, *data], files / "run", "--model-arg", "")


def test_a_model_arg_the_factory_does_not_take_is_one_line_naming_it(refused, files):
    data = ["--data", f"csv:{files / 'good.csv'}", "--target", "label", "--k", "3"]
    args = ["--model", f"{files / 'nets.py'}:good", "--model-arg", "width=8"]
    refused(["kfold", *args, *data], files / "run", "--model-arg", "width")


def test_the_python_api_raises_the_same_errors_as_distml_error_a_value_error(files):
    x = np.random.default_rng(1).normal(size=(40, 3)).astype(np.float32)
    with pytest.raises(distml.DistmlError, match="regression and multi-label") as error:
        distml.cross_validate("mlp", (x, x[:, 0]), k=2)
    assert isinstance(error.value, ValueError)
    with pytest.raises(ValueError, match="RuntimeError: out of ideas"):
        distml.cross_validate(f"{files / 'nets.py'}:raises", (x, np.repeat([0, 1], 20)), k=2)
