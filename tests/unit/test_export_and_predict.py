"""Saving, loading and exporting models; reading images for predict; loading ResNet18 weights files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from distml.data import IMAGE_MAGIC, normalize
from distml.errors import DistmlError
from distml.export import PROGRAM_FILE, load_model, metadata, save_model
from distml.models import build_model
from distml.predict import predict_files, read_images
from distml.resnet import build_resnet18


@pytest.fixture(scope="module")
def saved_cnn(tmp_path_factory):
    torch.manual_seed(1)
    model = build_model("cnn").eval()
    folder = save_model(tmp_path_factory.mktemp("saved") / "model", model, metadata("cnn", model))
    return model, folder


def test_state_dict_and_exported_program_give_the_same_logits(saved_cnn):
    model, folder = saved_cnn
    loaded = load_model(folder)
    assert loaded.metadata["architecture"] == "cnn"
    assert loaded.metadata["classes"] == [str(d) for d in range(10)]
    assert loaded.metadata["normalisation"]["mean"] == pytest.approx(0.1307)
    x = torch.randn(5, 1, 28, 28)
    expected = model(x)
    assert torch.allclose(loaded.model(x), expected)
    program = torch.export.load(folder / PROGRAM_FILE).module()
    assert torch.allclose(program(x), expected, atol=1e-5)
    assert program(torch.randn(1, 1, 28, 28)).shape == (1, 10)  # the batch size is dynamic


def test_exported_program_loads_without_distml(saved_cnn, tmp_path):
    model, folder = saved_cnn
    x = torch.randn(3, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x).detach(), tmp_path / "expected.pt")
    script = (
        "import sys; sys.modules['distml'] = None\n"  # any import of distml now fails
        "import torch\n"
        f"program = torch.export.load({str(folder / PROGRAM_FILE)!r}).module()\n"
        f"logits = program(torch.load({str(tmp_path / 'x.pt')!r}))\n"
        f"assert torch.allclose(logits, torch.load({str(tmp_path / 'expected.pt')!r}), atol=1e-5)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_load_model_rejects_wrong_weights(saved_cnn, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(saved_cnn[1], folder)
    torch.save(build_model("mlp").state_dict(), folder / "model.pt")
    with pytest.raises(DistmlError, match="does not hold this model's weights"):
        load_model(folder)
    with pytest.raises(DistmlError, match="no distml model"):
        load_model(tmp_path / "nowhere")


def _digit(path, dark_on_light: bool):
    pixels = np.zeros((56, 56), dtype=np.uint8)
    pixels[10:46, 24:32] = 255  # a "1", twice MNIST's size
    if dark_on_light:
        pixels = 255 - pixels
    Image.fromarray(pixels).save(path)


def test_read_images_resizes_and_inverts_dark_on_light(tmp_path):
    _digit(tmp_path / "light.png", dark_on_light=False)
    _digit(tmp_path / "dark.jpg", dark_on_light=True)
    images = read_images([tmp_path / "light.png", tmp_path / "dark.jpg"])
    assert images.pixels.shape == (2, 28, 28) and images.names == ["light.png", "dark.jpg"]
    for pixels in images.pixels:
        assert pixels[14, 14] > 200 and pixels[0, 0] < 30  # light stroke, dark background, as MNIST


def test_read_images_of_an_idx_file(sample_dir):
    images = read_images([sample_dir / "t10k-images-idx3-ubyte.gz"])
    assert images.pixels.shape == (1000, 28, 28)
    assert images.names[3] == "t10k-images-idx3-ubyte.gz[3]"


def test_unreadable_images_are_one_line_errors(tmp_path, saved_cnn):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DistmlError, match="broken.png is not a readable image"):
        read_images([tmp_path / "broken.png"])
    with pytest.raises(DistmlError, match="is not a file"):
        read_images([tmp_path / "missing.png"])
    (tmp_path / "bad-idx3-ubyte").write_bytes(IMAGE_MAGIC.to_bytes(4, "big") + b"\x00\x00")
    with pytest.raises(DistmlError, match="truncated"):
        predict_files(saved_cnn[1], [tmp_path / "bad-idx3-ubyte"])


def test_predict_probabilities_match_the_model(saved_cnn, sample_dir):
    model, folder = saved_cnn
    table = predict_files(folder, [sample_dir / "t10k-images-idx3-ubyte.gz"], sample_dir / "t10k-labels-idx1-ubyte.gz")
    assert len(table) == 1000
    x = torch.from_numpy(normalize(read_images([sample_dir / "t10k-images-idx3-ubyte.gz"]).pixels[:4]))
    probabilities = torch.softmax(model(x), 1).detach()
    assert table["probability"][:4].to_numpy() == pytest.approx(probabilities.max(1).values.numpy(), abs=1e-5)
    assert table["predicted"][:4].tolist() == [str(int(c)) for c in probabilities.argmax(1)]
    assert set(table["label"]) == {str(d) for d in range(10)}


def test_resnet_weights_from_a_state_dict_file(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    imagenet_like = resnet18(weights=None)  # 1000-class head: the backbone loads, the head is new
    torch.save(imagenet_like.state_dict(), tmp_path / "backbone.pt")
    model = build_resnet18(tmp_path / "backbone.pt", image_size=32)
    assert torch.equal(model.net.conv1.weight, imagenet_like.conv1.weight)
    assert model.net.fc.out_features == 10
    torch.save(model.net.state_dict(), tmp_path / "whole.pt")  # a 10-class file loads whole, head included
    again = build_resnet18(tmp_path / "whole.pt", image_size=32)
    assert torch.equal(again.net.fc.weight, model.net.fc.weight)


def test_bad_resnet_weights_files_are_one_line_errors(tmp_path):
    with pytest.raises(DistmlError, match="--weights: .*missing.pt is not a file"):
        build_resnet18(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"definitely not a pickle")
    with pytest.raises(DistmlError, match="not a PyTorch weights file"):
        build_resnet18(tmp_path / "garbage.pt")
    state = build_model("cnn").state_dict()
    torch.save(state, tmp_path / "cnn.pt")
    with pytest.raises(DistmlError, match="not a ResNet18 state dict"):
        build_resnet18(tmp_path / "cnn.pt")
    from torchvision.models import resnet18

    wrong = resnet18(weights=None).state_dict()
    wrong["conv1.weight"] = torch.zeros(64, 1, 7, 7)  # a one-channel stem
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(DistmlError, match="wrong shape for conv1.weight"):
        build_resnet18(tmp_path / "wrong.pt")
