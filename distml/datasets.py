"""Any in-memory classification dataset as one `Dataset`: float32 inputs, int64 labels 0..C-1 and the original class
values, whatever the user gave (MNIST, arrays or tensors, a torch Dataset, an image folder, an .npz or a CSV file).

Every bad input is refused here, as a one-line `DistmlError` naming the option at fault, so the layers above can
trust a `Dataset` without checking it again. pandas and PIL are imported only by the loaders that need them.
"""

from __future__ import annotations

import hashlib
import math
import re
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from distml.data import NUM_CLASSES, load_mnist, normalize
from distml.errors import DistmlError
from distml.folds import check_k

IN_MEMORY = "in memory"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
KINDS_HELP = "use mnist, imagefolder:DIR, npz:FILE or csv:FILE"
NOT_SUPPORTED = "regression and multi-label targets are not supported yet"
# The largest value of each image mode's pixels once read as "L", "RGB", "I" (16-bit files widen to it) or "F".
PIXEL_SCALE = {"L": 255.0, "RGB": 255.0, "I": 65535.0, "F": 1.0}


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value to compare by
class Dataset:
    """Examples ready to train on: float32 inputs, labels 0..num_classes-1, and the class each label number means."""

    inputs: np.ndarray  # float32, C-contiguous: images (N, C, H, W) or tabular (N, F)
    labels: np.ndarray  # int64 (N,), values 0..num_classes-1
    classes: tuple  # the original label values in sorted order (python int, float, str or bool)
    source: str  # "mnist", "arrays", "torch", "imagefolder", "npz" or "csv"
    location: str  # a path, or "in memory"
    normalized: bool = False  # the inputs are already standardised (MNIST's known constants)
    paths: tuple[str, ...] | None = None  # imagefolder: each example's file, relative to the folder
    rows: tuple[int, ...] | None = None  # csv: each example's row in the file (0-based, header excluded)
    origin: dict | None = None  # MNIST: where its files came from (data.MNIST.summary()), kept in summary()

    def __post_init__(self):
        n = len(self.labels)
        if self.inputs.dtype != np.float32 or not self.inputs.flags.c_contiguous or self.inputs.ndim not in (2, 4):
            raise ValueError(
                f"inputs must be C-contiguous float32 (N, F) or (N, C, H, W), got {self.inputs.dtype} "
                f"{self.inputs.shape}"
            )
        if self.labels.dtype != np.int64 or self.labels.ndim != 1 or len(self.inputs) != n:
            raise ValueError(
                f"labels must be int64 (N,) for {len(self.inputs)} inputs, got {self.labels.dtype} {self.labels.shape}"
            )
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"labels must lie in 0..{len(self.classes) - 1}")
        for name in ("paths", "rows"):
            if getattr(self, name) is not None and len(getattr(self, name)) != n:
                raise ValueError(f"{name} must have one entry per example ({n})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.inputs.shape[1:])

    @property
    def kind(self) -> str:
        return "images" if self.inputs.ndim == 4 else "tabular"

    @property
    def size(self) -> int:
        return int(len(self.labels))

    @property
    def description(self) -> str:
        if self.kind == "images":
            shape = f"{_shape(self.input_shape)} images"
        else:
            shape = f"{self.input_shape[0]} features"
        return f"{self.source} {self.location}: {self.size:,} examples, {shape}, {self.num_classes} classes"

    def summary(self) -> dict:
        """What config.json records of the data; `origin` (MNIST's files and raw-pixel digest) overrides."""
        if self.origin is not None and "digest" in self.origin:
            return {**self._described(self.origin["digest"]), **self.origin}
        digest = hashlib.sha256()
        digest.update(self.inputs.data)
        digest.update(np.ascontiguousarray(self.labels).data)
        return {**self._described(digest.hexdigest()[:16]), **(self.origin or {})}

    def _described(self, digest: str) -> dict:
        return {
            "source": self.source,
            "location": self.location,
            "examples": self.size,
            "input_shape": list(self.input_shape),
            "classes": list(self.classes),
            "digest": digest,
            "normalized": self.normalized,
        }

    def subset(self, index: np.ndarray) -> Dataset:
        """The examples at `index` (positions or a boolean mask), with the same classes."""
        index = np.asarray(index)
        positions = np.flatnonzero(index) if index.dtype == bool else index.astype(np.int64)
        return replace(
            self,
            inputs=np.ascontiguousarray(self.inputs[positions]),
            labels=self.labels[positions],
            paths=None if self.paths is None else tuple(self.paths[i] for i in positions),
            rows=None if self.rows is None else tuple(self.rows[i] for i in positions),
        )


def encode_labels(y, option: str = "--data", *, classes: tuple | None = None) -> tuple[np.ndarray, tuple]:
    """Labels of any hashable values -> int64 0..C-1 in the sorted order of the values, and those sorted classes.

    With `classes` (a training set's), the labels are numbered by that fixed list instead, and may cover only some
    of it. Refused: 2-D targets (multi-label, one-hot) and non-integral floats (regression), missing labels, and,
    without `classes`, a single class. Integral floats (0.0, 1.0) are classes 0 and 1.
    """
    values = _label_values(y, option)
    own, inverse = np.unique(values, return_inverse=True)
    own_classes = tuple(_python(value) for value in own)
    if classes is None:
        if len(own_classes) < 2:
            raise DistmlError(f"needs at least two classes; every label is {own_classes[0]!r}", option=option)
        return inverse.astype(np.int64).reshape(-1), own_classes
    classes = tuple(_python(value) for value in classes)
    return _renumber(own_classes, classes, option)[inverse.reshape(-1)], classes


def load_data(
    data,
    *,
    target: str | None = None,
    x_key: str = "x",
    y_key: str = "y",
    resize: tuple[int, int] | None = None,
    data_dir: Path | None = None,
    classes: tuple | None = None,
    option: str = "--data",
    ignore: tuple[str, ...] = (),
) -> Dataset:
    """`data` as a Dataset. It may be "mnist" (its 60,000 training images, from `data_dir` or as data.load_mnist
    finds them), an (X, y) pair of arrays or tensors, a map-style torch Dataset of (x, y) items, "imagefolder:DIR"
    (one sub-folder per class), "npz:FILE" (arrays `x_key` and `y_key`), "csv:FILE" (the `target` column is the
    label, every other column a number), a bare .npz or .csv path, or a Dataset.

    `classes` numbers the labels by a training set's classes, as a test set's must be. `target`, `x_key`, `y_key`
    and `resize` (H, W) apply only to the kinds they name and are ignored by the others, so one set of options can
    load a training and a test set of different kinds. Every refusal is one line naming `option` (or --target).
    `ignore`: CSV columns that are neither label nor feature (a --groups column).
    """
    kind, path = _kind_and_path(data, option)
    if kind == "dataset":
        if classes is None or tuple(classes) == data.classes:
            return data
        labels = _renumber(data.classes, tuple(_python(value) for value in classes), option)[data.labels]
        return replace(data, labels=labels, classes=tuple(_python(value) for value in classes))
    if kind == "mnist":
        return mnist_datasets(data_dir)[0]
    if kind == "arrays":
        x, y = data
        return _from_arrays(x, y, source="arrays", location=IN_MEMORY, classes=classes, option=option)
    if kind == "torch":
        x, y = _materialise(data, option)
        return _from_arrays(x, y, source="torch", location=IN_MEMORY, classes=classes, option=option)
    if kind == "imagefolder":
        return _load_image_folder(path, resize, classes, option)
    if kind == "npz":
        x, y = _read_npz(path, x_key, y_key, option)
        return _from_arrays(x, y, source="npz", location=str(path), classes=classes, option=option)
    return _load_csv(path, target, classes, option, ignore)


def mnist_test(data_dir: Path | None = None) -> Dataset:
    """MNIST's 10,000 test images, normalised like the training set."""
    return mnist_datasets(data_dir)[1]


def mnist_datasets(data_dir: Path | None = None) -> tuple[Dataset, Dataset]:
    """MNIST's 60,000 training and 10,000 test images, from one read of its files."""
    mnist = load_mnist(data_dir)
    # MNIST's digest is of its raw pixels and labels: a quarter of the bytes of the normalised floats
    digest = hashlib.sha256(np.ascontiguousarray(mnist.train_images).data)
    digest.update(np.ascontiguousarray(mnist.train_labels).data)
    origin = {**mnist.summary(), "digest": digest.hexdigest()[:16]}
    train = _mnist_split(mnist.train_images, mnist.train_labels, mnist.location, None, "--data")
    test = _mnist_split(mnist.test_images, mnist.test_labels, mnist.location, None, "--data")
    return replace(train, origin=origin), replace(test, origin=origin)


def check_folds_possible(dataset: Dataset, k: int) -> None:
    """k >= 2, and every class has at least k examples, or some fold would lack it (the class is named)."""
    check_k(dataset.labels, k, dataset.classes, "images" if dataset.kind == "images" else "examples")


def check_compatible(train: Dataset, test: Dataset, option: str = "--test-data") -> None:
    """A test set scored by models trained on `train`: the same input shape and scaling, only training classes, and
    labels numbered by the training classes (load it with `classes=train.classes`)."""
    if test.input_shape != train.input_shape:
        raise DistmlError(
            f"test inputs are {_shape(test.input_shape)} but the training inputs are {_shape(train.input_shape)}",
            option=option,
        )
    extra = [value for value in test.classes if value not in train.classes]
    if extra:
        raise DistmlError(
            f"test classes {_listed(extra)} are not among the training classes {_listed(train.classes)}", option=option
        )
    if test.classes != train.classes:
        raise DistmlError(
            "test labels are numbered by the test set's own classes; load it with the training classes", option=option
        )
    if test.normalized != train.normalized:
        which = "training" if train.normalized else "test"
        raise DistmlError(f"only the {which} inputs are normalised (MNIST's constants); load both alike", option=option)


def parse_resize(text: str) -> tuple[int, int]:
    """'64x48' -> (64, 48), height by width; '32' -> (32, 32)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not match:
        raise DistmlError(f"must be HxW (e.g. 64x48) or one side (e.g. 32), got {text!r}", option="--resize")
    height = int(match.group(1))
    width = int(match.group(2) or height)
    if height < 1 or width < 1:
        raise DistmlError(f"sides must be at least 1, got {text!r}", option="--resize")
    return height, width


def _kind_and_path(data, option: str) -> tuple[str, Path | None]:
    """What `data` is: "dataset", "mnist", "arrays", "torch", "imagefolder", "npz" or "csv", and its path if any."""
    if isinstance(data, Dataset):
        return "dataset", None
    if isinstance(data, (str, Path)):
        return _parse_data_text(str(data), option)
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise DistmlError(f"an (X, y) pair needs two arrays, got {len(data)} items", option=option)
        return "arrays", None
    if hasattr(data, "shape"):
        raise DistmlError(f"got one array of shape {tuple(data.shape)}; pass (X, y)", option=option)
    if hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, dict):
        return "torch", None
    raise DistmlError(
        f"cannot use a {type(data).__name__} as data; pass (X, y), a torch Dataset, a distml Dataset, or {KINDS_HELP}",
        option=option,
    )


def _parse_data_text(text: str, option: str) -> tuple[str, Path | None]:
    if text == "mnist":
        return "mnist", None
    kind, colon, rest = text.partition(":")
    if colon and re.fullmatch(r"[A-Za-z][\w-]*", kind):
        if kind == "mnist":
            raise DistmlError("mnist takes no path; give MNIST's folder with --data-dir", option=option)
        if kind not in ("imagefolder", "npz", "csv"):
            raise DistmlError(f"unknown data kind {kind!r}; {KINDS_HELP}", option=option)
        if not rest:
            raise DistmlError(f"{kind}: needs a path after the colon", option=option)
        path = Path(rest).expanduser()
    else:
        kind, path = None, Path(text).expanduser()
    if not path.exists():
        raise DistmlError(f"{path} does not exist", option=option)
    if kind is None:
        kind = {".npz": "npz", ".csv": "csv"}.get(path.suffix.lower())
        if kind is None:
            raise DistmlError(f"say what {path} is: imagefolder:{path}, npz:{path} or csv:{path}", option=option)
    if kind == "imagefolder" and not path.is_dir():
        raise DistmlError(f"{path} is not a folder", option=option)
    if kind != "imagefolder" and not path.is_file():
        raise DistmlError(f"{path} is not a file", option=option)
    return kind, path


def _mnist_split(images: np.ndarray, labels: np.ndarray, location: str, classes, option: str) -> Dataset:
    labels, classes = encode_labels(labels, option, classes=classes or tuple(range(NUM_CLASSES)))
    return Dataset(normalize(images), labels, classes, "mnist", location, normalized=True)


def _from_arrays(x, y, *, source: str, location: str, classes, option: str, paths=None, rows=None) -> Dataset:
    x, y = _to_numpy(x), _to_numpy(y)
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise DistmlError(
            f"X has shape {x.shape} but y has shape {y.shape}; they need one row per example", option=option
        )
    inputs = _inputs(x, option)
    labels, classes = encode_labels(y, option, classes=classes)
    return Dataset(inputs, labels, classes, source, location, paths=paths, rows=rows)


def as_inputs(x, option: str = "--data") -> np.ndarray:
    """Inputs alone (no labels), with the conventions of load_data: float32 (N, C, H, W) or (N, F), uint8 / 255."""
    return _inputs(_to_numpy(x), option)


def _to_numpy(value) -> np.ndarray:
    """A torch tensor (checked by its methods, so torch need not be imported), a PIL image or anything array-like."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _inputs(x: np.ndarray, option: str) -> np.ndarray:
    """float32, C-contiguous (N, C, H, W) or (N, F); uint8 pixels scaled to [0, 1]."""
    if x.dtype.kind not in "biuf":
        raise DistmlError(f"inputs must be numbers, got dtype {x.dtype}", option=option)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim not in (2, 4):
        raise DistmlError(f"inputs must be (N, C, H, W), (N, H, W) or (N, F), got shape {x.shape}", option=option)
    if len(x) == 0 or 0 in x.shape[1:]:
        raise DistmlError(f"inputs are empty: shape {x.shape}", option=option)
    inputs = np.ascontiguousarray(x, dtype=np.float32)
    if x.dtype == np.uint8:
        inputs *= np.float32(1 / 255)
    finite = np.isfinite(inputs)
    if not finite.all():
        position = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise DistmlError(
            f"inputs hold {inputs[position]} (not a finite number) in example {position[0]}, at {position[1:]}",
            option=option,
        )
    return inputs


def _label_values(y, option: str) -> np.ndarray:
    """A 1-D array of int64, str or bool labels, none missing."""
    values = _to_numpy(y)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim == 2:
        raise DistmlError(
            f"{NOT_SUPPORTED}: the target has shape {values.shape}; give one class label per example", option=option
        )
    if values.ndim != 1:
        raise DistmlError(f"the target must be one label per example, got shape {values.shape}", option=option)
    if len(values) == 0:
        raise DistmlError("there are no labels", option=option)
    if values.dtype == object:
        values = _object_labels(values, option)
    if values.dtype.kind == "f":
        finite = np.isfinite(values)
        if not finite.all():
            i = int(np.flatnonzero(~finite)[0])
            raise DistmlError(f"the label of example {i} is {values[i]}", option=option)
        whole = values == np.round(values)
        if not whole.all():
            i = int(np.flatnonzero(~whole)[0])
            raise DistmlError(
                f"{NOT_SUPPORTED}: the label of example {i} is {values[i]}, not a whole number", option=option
            )
        return values.astype(np.int64)
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    if values.dtype.kind == "S":
        return values.astype(str)
    if values.dtype.kind in "bU":
        return values
    raise DistmlError(f"labels of dtype {values.dtype} are not supported", option=option)


def _object_labels(values: np.ndarray, option: str) -> np.ndarray:
    """Python objects as one typed array: all strings, all numbers, or all booleans."""
    for i, value in enumerate(values):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise DistmlError(f"the label of example {i} is missing ({value})", option=option)
    if all(isinstance(value, str) for value in values):
        return values.astype(str)
    if all(isinstance(value, (bool, np.bool_)) for value in values):
        return values.astype(bool)
    if all(isinstance(value, (int, float, np.integer, np.floating)) for value in values):
        return np.array(values.tolist())
    kinds = {type(value).__name__: value for value in values}
    shown = ", ".join(f"{value!r} ({name})" for name, value in list(kinds.items())[:3])
    raise DistmlError(f"labels mix types: {shown}; give them all as numbers or all as strings", option=option)


def _python(value):
    """A numpy scalar as the plain python value JSON knows; integral floats as ints."""
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _renumber(own_classes: tuple, classes: tuple, option: str) -> np.ndarray:
    """For each of `own_classes`, its number among `classes`."""
    number = {value: i for i, value in enumerate(classes)}
    unknown = [value for value in own_classes if value not in number]
    if unknown:
        raise DistmlError(f"label {unknown[0]!r} is not one of the training classes {_listed(classes)}", option=option)
    return np.array([number[value] for value in own_classes], dtype=np.int64)


def _materialise(dataset, option: str) -> tuple[np.ndarray, np.ndarray]:
    """A map-style dataset of (x, y) items, read once into (X, y) arrays; PIL images become (C, H, W) like
    torchvision's ToTensor."""
    count = len(dataset)
    if count == 0:
        raise DistmlError(f"the {type(dataset).__name__} is empty", option=option)
    inputs, labels = [], []
    for i in range(count):
        item = dataset[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise DistmlError(
                f"item {i} of the {type(dataset).__name__} is not an (input, label) pair but {type(item).__name__}",
                option=option,
            )
        image, y = item
        x = _to_numpy(image)
        if hasattr(image, "getbands") and x.ndim == 3:  # a PIL image's pixels come as (H, W, C)
            x = x.transpose(2, 0, 1)
        if inputs and x.shape != inputs[0].shape:
            raise DistmlError(
                f"item {i} has an input of shape {x.shape} but item 0 one of {inputs[0].shape}; all must be alike",
                option=option,
            )
        inputs.append(x)
        labels.append(_to_numpy(y))
    return np.stack(inputs), np.stack(labels)


def _read_npz(path: Path, x_key: str, y_key: str, option: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DistmlError(f"cannot read {path}: {_first_line(exc)}", option=option) from None
    if not hasattr(archive, "files"):  # np.load gives a bare array for an .npy file
        raise DistmlError(f"{path} holds a single array, not an .npz archive of inputs and labels", option=option)
    with archive:
        for key in (x_key, y_key):
            if key not in archive.files:
                raise DistmlError(
                    f"{path} has no array {key!r}; it has {_listed(archive.files)} (choose with --x-key and --y-key)",
                    option=option,
                )
        try:
            return archive[x_key], archive[y_key]
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise DistmlError(f"cannot read {path}: {_first_line(exc)}", option=option) from None


def _load_csv(path: Path, target: str | None, classes, option: str, ignore: tuple[str, ...] = ()) -> Dataset:
    """A CSV's `target` column as labels and every other column but those in `ignore` (a group column, say) as
    features."""
    import pandas as pd  # a slow import, needed only for CSV files (the kfold driver starts without it)

    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DistmlError(f"cannot read CSV {path}: {_first_line(exc)}", option=option) from None
    columns = [str(name) for name in frame.columns]
    if target is None:
        raise DistmlError(f"name the label column of {path}; its columns are {_listed(columns)}", option="--target")
    if target not in frame.columns:
        raise DistmlError(
            f"{target!r} is not a column of {path}; its columns are {_listed(columns)}", option="--target"
        )
    if len(frame) == 0:
        raise DistmlError(f"{path} has a header but no rows", option=option)
    missing = frame.isna().to_numpy()
    if missing.any():
        row, column = (int(i) for i in np.argwhere(missing)[0])
        raise DistmlError(
            f"row {row} of {path} (0-based, header excluded) has no value in column {columns[column]!r}", option=option
        )
    features = frame.drop(columns=[target, *(name for name in ignore if name in frame.columns)])
    if features.shape[1] == 0:
        raise DistmlError(f"{path} has no columns besides the label column {target!r}", option=option)
    for name in features.columns:
        if not pd.api.types.is_numeric_dtype(features[name]):
            row = int(np.flatnonzero(pd.to_numeric(features[name], errors="coerce").isna().to_numpy())[0])
            raise DistmlError(
                f"column {name!r} of {path} is not numeric (row {row} holds {features[name].iloc[row]!r}); every "
                f"column but --target must be numbers",
                option=option,
            )
    return _from_arrays(
        features.to_numpy(dtype=np.float32),
        frame[target].to_numpy(),
        source="csv",
        location=str(path),
        classes=classes,
        option=option,
        rows=tuple(range(len(frame))),
    )


def _load_image_folder(folder: Path, resize: tuple[int, int] | None, classes, option: str) -> Dataset:
    class_folders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    needed = 1 if classes is not None else 2  # a test set may hold a single class
    if len(class_folders) < needed:
        raise DistmlError(
            f"{folder} needs one sub-folder per class, at least {needed}; it has {len(class_folders)}"
            + (f" ({_listed([p.name for p in class_folders])})" if class_folders else ""),
            option=option,
        )
    files, names = [], []
    for class_folder in class_folders:
        found = sorted(p for p in class_folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise DistmlError(
                f"class folder {class_folder} holds no images ({', '.join(IMAGE_SUFFIXES)})", option=option
            )
        files += found
        names += [class_folder.name] * len(found)
    relative = [p.relative_to(folder).as_posix() for p in files]
    images = []
    for path, name in zip(files, relative, strict=True):
        image = _read_image(path, resize, option)
        if images and image.shape[1:] != images[0].shape[1:]:
            raise DistmlError(
                f"images differ in size: {relative[0]} is {_shape(images[0].shape[1:])} and {name} is "
                f"{_shape(image.shape[1:])} (HxW); pass --resize HxW to resize them all",
                option=option,
            )
        images.append(image)
    if any(len(image) == 3 for image in images):  # a folder mixing grayscale and colour: all colour
        images = [np.repeat(image, 3, axis=0) if len(image) == 1 else image for image in images]
    return _from_arrays(
        np.stack(images),
        np.array(names),
        source="imagefolder",
        location=str(folder),
        classes=classes,
        option=option,
        paths=tuple(relative),
    )


def _read_image(path: Path, resize: tuple[int, int] | None, option: str) -> np.ndarray:
    """One image file as float32 (C, H, W) in [0, 1]: one channel for grayscale modes, three for all others."""
    from PIL import Image  # needed only for image folders

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("1", "LA"):
                image = image.convert("L")
            elif image.mode.startswith("I;16"):  # 16-bit grayscale widens to 32-bit ints, which PIL resizes
                image = image.convert("I")
            elif image.mode not in ("L", "I", "F"):
                image = image.convert("RGB")
            if resize is not None:
                image = image.resize((resize[1], resize[0]), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.float32) / np.float32(PIXEL_SCALE[image.mode])
    except (OSError, SyntaxError, ValueError) as exc:  # PIL raises all three for broken files
        raise DistmlError(f"cannot read image {path}: {_first_line(exc)}", option=option) from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _shape(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def _listed(values, limit: int = 10) -> str:
    values = list(values)
    shown = ", ".join(repr(value) for value in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")
