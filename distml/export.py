"""Saving trained models and loading them again.

A model folder holds three files:
- `model.pt`: the state dict, loaded with `weights_only=True` by `load_model`;
- `model.json`: what a user needs besides the weights (architecture, classes, input shape, normalisation, image
  size, and the factory's arguments);
- `model.pt2`: a `torch.export` program that loads without distml: `torch.export.load(path).module()`. A user's
  network that torch.export cannot trace has none: model.json then says `"program": null` and why.
A model takes float32 inputs of shape (N, *input_shape) normalised as model.json's `normalisation` says: MNIST's
built-in runs take MNIST-normalised (N, 1, 28, 28) images (pixel / 255, minus mean, over std); a model normalised
"in-model" carries its own Normalize step and takes the raw values.

Loading a model whose architecture is `file.py:function` executes that file, as training it did: load only model
folders you trust.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from distml.atomic import write_atomic, write_json
from distml.data import IMAGE_SIDE, MNIST_MEAN, MNIST_STD, NUM_CLASSES
from distml.errors import DistmlError
from distml.models import (
    MODELS,
    FoldEnsemble,
    build_model,
    count_parameters,
    exception_line,
    is_builtin,
    model_label,
    with_normalization,
)
from distml.resnet import MnistToResNet

if TYPE_CHECKING:
    from distml.datasets import Dataset
    from distml.recipe import ModelRecipe

STATE_FILE = "model.pt"
METADATA_FILE = "model.json"
PROGRAM_FILE = "model.pt2"


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    metadata: dict


CALLABLE_PREFIX = "callable "  # models.model_label's name for a model given as a Python callable
MNIST_NORMALISATION = {"scale": "pixel / 255", "mean": MNIST_MEAN, "std": MNIST_STD}


def metadata(
    architecture,
    model: nn.Module,
    image_size: int = IMAGE_SIDE,
    classes: list | None = None,
    input_shape: tuple[int, ...] | list[int] | None = None,
    normalisation: dict | None = None,
    **extra,
) -> dict:
    """What model.json records; `image_size` is the size the network sees (ResNet18 resizes its input to it).

    `architecture` is a built-in name, "resnet18", an import string or a callable (recorded by its label). The
    defaults describe MNIST: the digits, (1, 28, 28) images and MNIST's normalisation; other data pass their own
    classes (JSON values), input shape and `{"kind": "in-model"}` (the model carries its Normalize step) or
    `{"kind": "none"}`. `extra` may hold `model_kwargs`, `num_classes` and `normalized_in_model`, which
    load_model honours.
    """
    return {
        "architecture": model_label(architecture),
        "classes": [str(digit) for digit in range(NUM_CLASSES)] if classes is None else list(classes),
        "input_shape": [1, IMAGE_SIDE, IMAGE_SIDE] if input_shape is None else [int(side) for side in input_shape],
        "normalisation": dict(MNIST_NORMALISATION) if normalisation is None else normalisation,
        "image_size": image_size,
        "parameters": count_parameters(model),
        **extra,
    }


def model_metadata(recipe: ModelRecipe, model: nn.Module, dataset: Dataset, **extra) -> dict:
    """model.json of a model trained on `dataset`: what rebuilds it (its import string, keywords, classes, input
    shape) and how its inputs are normalised. MNIST models keep MNIST's normalisation as before."""
    if dataset.source == "mnist" and recipe.normalize == "none":
        return metadata(model_label(recipe.model), model, data=dataset.source, **extra)
    in_model = recipe.normalize != "none"
    sides = [m.image_size for m in model.modules() if isinstance(m, MnistToResNet)]  # the size ResNet18 sees
    if sides:
        extra.setdefault("image_size", sides[0])
    return metadata(
        model_label(recipe.model),
        model,
        classes=list(dataset.classes),
        input_shape=list(dataset.input_shape),
        normalisation={"kind": "in-model" if in_model else "none"},
        model_kwargs=recipe.model_kwargs,
        num_classes=recipe.num_classes,
        normalized_in_model=in_model,
        data=dataset.source,
        **extra,
    )


def _is_distml_network(architecture: str) -> bool:
    """The networks distml defines, which must export: a failure is distml's bug, not the user's."""
    return is_builtin(architecture) or architecture == "resnet18"


def _export(model: nn.Module, input_shape: list[int]) -> torch.export.ExportedProgram:
    example = torch.zeros(2, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    # torch prints the partial graph of a failed export to stderr; save_model says what failed in one line. The
    # redirect is process-wide for the export's few seconds, once a run has finished training.
    with contextlib.redirect_stderr(io.StringIO()):
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def save_model(folder: Path, model: nn.Module, info: dict) -> Path:
    """Write the state dict, model.json and the torch.export program into `folder`.

    A user's network that torch.export cannot trace (Python control flow on tensor values, say) is still saved:
    its state dict and model.json, which records `"program": null` and the export error, with a one-line
    UserWarning. distml's own networks must export."""
    folder = Path(folder)
    model = model.cpu().eval()
    write_atomic(folder / STATE_FILE, lambda tmp: torch.save(model.state_dict(), tmp))
    try:
        program = _export(model, info["input_shape"])
    except Exception as exc:
        if _is_distml_network(info["architecture"]):
            raise
        error = exception_line(exc)
        warnings.warn(
            f"torch.export could not export {info['architecture']} ({error}); saved its state dict and model.json only",
            UserWarning,
            stacklevel=1,  # attributed to distml, whose warnings the CLI shows as one line
        )
        (folder / PROGRAM_FILE).unlink(missing_ok=True)  # a program left by an earlier save would not match
        files = {"state_dict": STATE_FILE, "program": None}
        write_json(folder / METADATA_FILE, {**info, "files": files, "export_error": error})
        return folder

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
    """An untrained network of the architecture model.json names, without its Normalize step (load_model adds it).

    An import-string architecture is rebuilt through its factory with model.json's `num_classes`, `input_shape`
    and `model_kwargs`; a `file.py:function` one executes that file."""
    architecture = info.get("architecture")
    if architecture == "resnet18":
        from distml.resnet import build_resnet18  # torchvision: a slow import, needed only for ResNet18

        classes = int(info.get("num_classes", len(info.get("classes", ())) or 10))
        return build_resnet18("none", classes, image_size=int(info["image_size"]))
    if isinstance(architecture, str) and architecture.startswith(CALLABLE_PREFIX):
        raise DistmlError(
            f"this model was given as a Python callable ({architecture[len(CALLABLE_PREFIX) :]}) and can only be "
            "loaded with its own code: torch.load the state dict (model.pt) into your own instance, or use "
            "model.pt2 when present"
        )
    if not isinstance(architecture, str) or (architecture not in MODELS and ":" not in architecture):
        raise DistmlError(f"model.json names an unknown architecture {architecture!r}")
    num_classes = int(info.get("num_classes", len(info.get("classes") or ()) or NUM_CLASSES))
    input_shape = tuple(info.get("input_shape") or (1, IMAGE_SIDE, IMAGE_SIDE))
    try:
        return build_model(architecture, num_classes, input_shape, info.get("model_kwargs"))
    except DistmlError as exc:  # the user's --model option is not what is at fault here
        raise DistmlError(f"cannot rebuild model.json's architecture {architecture!r}: {exc.message}") from None


def _read_metadata(folder: Path) -> dict:
    try:
        return json.loads((folder / METADATA_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise DistmlError(f"{folder / METADATA_FILE} cannot be read: {exc}") from None


ENSEMBLE = "ensemble"  # model.json's architecture of a FoldEnsemble, whose members are model folders of their own


def save_ensemble(folder: Path, members: list[Path], info: dict) -> Path:
    """An ensemble model folder over the model folders `members` (saved already): a model.pt2 program that outputs
    log(mean p) of the members, which loads like any other; model.json names the members by relative path (their
    own model.json say how each was built); `info` is a member's model.json (classes, input shape, data)."""
    folder = Path(folder)
    model = FoldEnsemble([load_model(member).model for member in members])
    relative = [os.path.relpath(member, folder) for member in members]
    keep = ("classes", "input_shape", "normalisation", "image_size", "data")
    extra = {key: info[key] for key in keep if key in info}
    return save_model(folder, model, {**metadata(ENSEMBLE, model, **extra), "members": relative})


def load_model(path: Path) -> LoadedModel:
    """The network of a model folder with its trained weights, in eval mode on the CPU.

    Loading a model whose architecture is `file.py:function` executes that file."""
    folder = model_folder(path)
    info = _read_metadata(folder)
    if info.get("architecture") == ENSEMBLE:
        members = [load_model(folder / member).model for member in info.get("members", [])]
        return LoadedModel(FoldEnsemble(members).eval(), info)
    model = build_architecture(info)
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        if info.get("normalized_in_model"):
            # placeholder statistics shaped as the saved ones (per channel or per value), which then replace them
            mean, std = torch.zeros(state["0.mean"].numel()), torch.ones(state["0.std"].numel())
            model = with_normalization(model, mean, std, info["input_shape"])
        model.load_state_dict(state)
    except Exception as exc:
        raise DistmlError(f"{folder / STATE_FILE} does not hold this model's weights ({exception_line(exc)})") from None
    return LoadedModel(model.eval(), info)


def load_program(path: Path) -> nn.Module:
    """The exported program of a model folder, as a callable module (no distml code involved)."""
    folder = model_folder(path)
    info = _read_metadata(folder)
    if info.get("files", {}).get("program", PROGRAM_FILE) is None:
        raise DistmlError(
            f"{folder} has no exported program: torch.export failed when it was saved "
            f"({info.get('export_error', 'no reason recorded')}); load it with load_model instead"
        )
    return torch.export.load(folder / PROGRAM_FILE).module()
