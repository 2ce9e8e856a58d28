"""Saving trained models and loading them again.

A model folder holds three files:
- `model.pt`: the state dict, loaded with `weights_only=True` by `load_model`;
- `model.json`: what a user needs besides the weights (architecture, classes, normalisation, image size);
- `model.pt2`: a `torch.export` program that loads without distml: `torch.export.load(path).module()`.
Every model takes MNIST-normalised (N, 1, 28, 28) float32 images: pixel / 255, minus mean, over std (model.json).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distml.atomic import write_atomic, write_json
from distml.data import IMAGE_SIDE, MNIST_MEAN, MNIST_STD, NUM_CLASSES
from distml.errors import DistmlError
from distml.models import MODELS, build_model, count_parameters

STATE_FILE = "model.pt"
METADATA_FILE = "model.json"
PROGRAM_FILE = "model.pt2"


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    metadata: dict


def metadata(architecture: str, model: nn.Module, image_size: int = IMAGE_SIDE, **extra) -> dict:
    """What model.json records; `image_size` is the size the network sees (ResNet18 resizes its input to it)."""
    return {
        "architecture": architecture,
        "classes": [str(digit) for digit in range(NUM_CLASSES)],
        "input_shape": [1, IMAGE_SIDE, IMAGE_SIDE],
        "normalisation": {"scale": "pixel / 255", "mean": MNIST_MEAN, "std": MNIST_STD},
        "image_size": image_size,
        "parameters": count_parameters(model),
        **extra,
    }


def save_model(folder: Path, model: nn.Module, info: dict) -> Path:
    """Write the state dict, model.json and the torch.export program into `folder`."""
    folder = Path(folder)
    model = model.cpu().eval()
    write_atomic(folder / STATE_FILE, lambda tmp: torch.save(model.state_dict(), tmp))
    example = torch.zeros(2, *info["input_shape"])
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))

    def write_program(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: torch.export wants a path ending in .pt2, tmp doesn't
            torch.export.save(program, f)

    write_atomic(folder / PROGRAM_FILE, write_program)
    write_json(folder / METADATA_FILE, {**info, "files": {"state_dict": STATE_FILE, "program": PROGRAM_FILE}})
    return folder


def model_folder(path: Path) -> Path:
    """The model folder given itself, one of its files, or a run folder holding `model/`."""
    path = Path(path)
    for candidate in (path, path.parent, path / "model"):
        if (candidate / METADATA_FILE).is_file():
            return candidate
    raise DistmlError(f"{path} is no distml model (no {METADATA_FILE} in it, beside it or in {path / 'model'})")


def build_architecture(info: dict) -> nn.Module:
    """An untrained network of the architecture model.json names."""
    architecture = info.get("architecture")
    if architecture in MODELS:
        return build_model(architecture)
    if architecture == "resnet18":
        from distml.resnet import build_resnet18  # torchvision: a slow import, needed only for ResNet18

        return build_resnet18("none", image_size=int(info["image_size"]))
    raise DistmlError(f"model.json names an unknown architecture {architecture!r}")


def load_model(path: Path) -> LoadedModel:
    """The network of a model folder with its trained weights, in eval mode on the CPU."""
    folder = model_folder(path)
    try:
        info = json.loads((folder / METADATA_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise DistmlError(f"{folder / METADATA_FILE} cannot be read: {exc}") from None
    model = build_architecture(info)
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise DistmlError(f"{folder / STATE_FILE} does not hold this model's weights ({first_line})") from None
    return LoadedModel(model.eval(), info)


def load_program(path: Path) -> nn.Module:
    """The exported program of a model folder, as a callable module (no distml code involved)."""
    return torch.export.load(model_folder(path) / PROGRAM_FILE).module()
