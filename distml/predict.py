"""`distml predict`: classify image files (PNG/JPEG, or IDX files of many images) with a saved model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from distml.data import IMAGE_MAGIC, IMAGE_SIDE, LABEL_MAGIC, normalize, read_idx
from distml.datasets import as_inputs, load_data
from distml.errors import DistmlError
from distml.export import load_model
from distml.train import predict as predict_logits

IDX_SUFFIXES = ("-ubyte", "-ubyte.gz", ".idx", ".idx.gz")
MAX_PICTURE_PIXELS = 40_000_000  # a digit photo needs far fewer; PIL's own bomb limit is 179 M


@dataclass(frozen=True)
class Images:
    pixels: np.ndarray  # uint8 (N, 28, 28), light digits on a dark background as in MNIST
    names: list[str]


def _is_idx(path: Path) -> bool:
    return path.name.endswith(IDX_SUFFIXES)


def read_picture(path: Path) -> np.ndarray:
    """A PNG/JPEG as a 28x28 uint8 MNIST-style digit: grey, resized, inverted when it is dark on light."""
    from PIL import Image, UnidentifiedImageError  # only for picture files, not IDX ones

    try:
        with Image.open(path) as image:  # reads the header only: the size is known before any pixel is decoded
            if image.width * image.height > MAX_PICTURE_PIXELS:
                raise DistmlError(
                    f"{path} is {image.width}x{image.height} pixels, more than a digit needs "
                    f"({MAX_PICTURE_PIXELS:,} at most); shrink it first"
                )
            grey = image.convert("L")
            if grey.size != (IMAGE_SIDE, IMAGE_SIDE):
                grey = grey.resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BILINEAR)
            pixels = np.asarray(grey, dtype=np.uint8)
    except DistmlError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise DistmlError(f"{path} is not a readable image ({type(exc).__name__})") from None
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return 255 - pixels if border.mean() > 127 else pixels  # MNIST digits are light on a dark background


def read_images(paths: list[Path]) -> Images:
    """All images of the given files, in order; an IDX file contributes every image it holds."""
    arrays, names = [], []
    for path in map(Path, paths):
        if path.is_dir():
            raise DistmlError(f"{path} is a folder: give image files (PNG, JPEG) or IDX files, e.g. {path}/*.png")
        if not path.is_file():
            raise DistmlError(f"{path} is not a file")
        if _is_idx(path):
            images = read_idx(path, IMAGE_MAGIC)
            if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
                raise DistmlError(f"{path}: images are {images.shape[1:]}, expected 28x28")
            if not len(images):
                raise DistmlError(f"{path} holds no images")
            arrays.append(images)
            names.extend(f"{path.name}[{i}]" for i in range(len(images)))
        else:
            arrays.append(read_picture(path)[None])
            names.append(path.name)
    return Images(np.concatenate(arrays), names)


def predict_files(model_path: Path, paths: list[Path], labels_path: Path | None = None) -> pd.DataFrame:
    """One row per image: file, predicted class, its probability, and the true label when `labels_path` is given."""
    if not paths:
        raise DistmlError("give at least one image file")
    loaded = load_model(model_path)
    images = read_images(paths)
    with torch.no_grad():
        probabilities = torch.softmax(predict_logits(loaded.model, torch.from_numpy(normalize(images.pixels))), 1)
    best, predicted = probabilities.max(1)
    classes = np.array(loaded.metadata["classes"])
    table = pd.DataFrame({"file": images.names, "predicted": classes[predicted.numpy()], "probability": best.numpy()})
    if labels_path is not None:
        labels = read_idx(Path(labels_path), LABEL_MAGIC)
        if len(labels) != len(table):
            raise DistmlError(f"{labels_path} has {len(labels)} labels for {len(table)} images", option="--labels")
        if labels.size and labels.max() >= len(classes):
            raise DistmlError(
                f"{labels_path} holds label {int(labels.max())}, but the model has {len(classes)} classes",
                option="--labels",
            )
        table["label"] = classes[labels.astype(np.int64)]
    return table


def predict_dataset(model_path: Path, data, target: str | None = None) -> pd.DataFrame:
    """One row per example of `data` (inputs alone as an array or tensor, or any kind load_data takes; labels are
    ignored): the predicted class, by name, and each class's probability (columns p_CLASS)."""
    loaded = load_model(model_path)
    info = loaded.metadata
    if isinstance(data, np.ndarray) or hasattr(data, "detach"):
        inputs, normalized = as_inputs(data, option="data"), False
    else:
        dataset = load_data(data, target=target, option="data")
        inputs, normalized = dataset.inputs, dataset.normalized
    expected = tuple(info.get("input_shape", ()))
    if inputs.shape[1:] != expected:
        raise DistmlError(f"the model takes inputs of shape {expected}, got {inputs.shape[1:]}", option="data")
    scale = info.get("normalisation", {})
    if "mean" in scale and not normalized:  # MNIST's models take MNIST-normalised inputs
        inputs = ((inputs - scale["mean"]) / scale["std"]).astype(np.float32)
    with torch.no_grad():
        probabilities = torch.softmax(predict_logits(loaded.model, torch.from_numpy(inputs)), 1).numpy()
    classes = list(info["classes"])
    table = pd.DataFrame({"predicted": [classes[i] for i in probabilities.argmax(1)]})
    for column, name in enumerate(classes):
        table[f"p_{name}"] = probabilities[:, column]
    return table
