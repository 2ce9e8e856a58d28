"""distml.datasets on real data and real files: scikit-learn's digits and iris, PNGs written with PIL, .npz and CSV
files written with numpy and pandas, a torch TensorDataset, and MNIST's sample shipped with distml."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits, load_iris

from distml.data import load_mnist, normalize
from distml.datasets import (
    Dataset,
    check_compatible,
    check_folds_possible,
    encode_labels,
    load_data,
    mnist_test,
    parse_resize,
)
from distml.errors import DistmlError

IRIS_COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def iris():
    return load_iris()


def refused(named: str, match: str, call, *args, **kwargs) -> str:
    """`call` raises a one-line DistmlError naming the option `named` and matching `match`; its text."""
    with pytest.raises(DistmlError, match=match) as info:
        call(*args, **kwargs)
    text = str(info.value)
    assert "\n" not in text
    assert info.value.option == named and text.startswith(f"{named}: ")
    return text


def write_iris_csv(path, iris, rows=slice(None)):
    frame = pd.DataFrame(iris.data[rows], columns=IRIS_COLUMNS)
    frame["species"] = iris.target_names[iris.target[rows]]
    frame.to_csv(path, index=False)
    return path


def digit_png(path, image, mode="L"):
    """One of scikit-learn's 8x8 digits (0..16) as an 8-bit PNG, gray or with the digit in each RGB channel."""
    pixels = (image * 15).astype(np.uint8)  # 0..240
    if mode == "RGB":
        pixels = np.stack([pixels, 255 - pixels, pixels // 2], axis=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path)
    return pixels


# Arrays, tensors and torch datasets


def test_digits_as_n_8_8_arrays_become_one_channel_float32_images_with_classes_0_to_9(digits):
    data = load_data((digits.images, digits.target))
    assert data.inputs.shape == (1797, 1, 8, 8) and data.inputs.dtype == np.float32
    assert data.inputs.flags.c_contiguous
    assert data.kind == "images" and data.input_shape == (1, 8, 8) and data.size == 1797
    assert data.classes == tuple(range(10)) and all(type(c) is int for c in data.classes)
    np.testing.assert_array_equal(data.labels, digits.target)
    assert data.labels.dtype == np.int64
    # float64 inputs are cast, not rescaled: the digits' pixels stay 0..16
    np.testing.assert_array_equal(data.inputs[:, 0], digits.images.astype(np.float32))
    assert data.inputs.max() == 16.0
    assert (data.source, data.location, data.normalized) == ("arrays", "in memory", False)
    assert data.paths is None and data.rows is None
    assert data.description == "arrays in memory: 1,797 examples, 1x8x8 images, 10 classes"


def test_digits_as_64_features_are_tabular(digits):
    data = load_data((digits.data, digits.target))
    assert data.inputs.shape == (1797, 64) and data.kind == "tabular" and data.input_shape == (64,)
    assert data.description == "arrays in memory: 1,797 examples, 64 features, 10 classes"


def test_uint8_images_are_scaled_to_0_1_and_n_c_h_w_kept(digits):
    pixels = (digits.images * 15).astype(np.uint8)[:, None]  # (N, 1, 8, 8), 0..240
    data = load_data((pixels, digits.target))
    assert data.inputs.shape == (1797, 1, 8, 8)
    np.testing.assert_allclose(data.inputs, pixels / 255.0, rtol=1e-6)
    assert data.inputs.max() == pytest.approx(240 / 255)


def test_torch_tensors_give_the_same_dataset_as_numpy_arrays(digits):
    x = torch.tensor(digits.data, dtype=torch.float32, requires_grad=True)
    data = load_data((x, torch.tensor(digits.target)))
    np.testing.assert_array_equal(data.inputs, digits.data.astype(np.float32))
    np.testing.assert_array_equal(data.labels, digits.target)
    assert data.summary()["digest"] == load_data((digits.data, digits.target)).summary()["digest"]


def test_a_torch_tensor_dataset_is_materialised_into_arrays(digits):
    dataset = torch.utils.data.TensorDataset(torch.tensor(digits.images[:300]), torch.tensor(digits.target[:300]))
    data = load_data(dataset)
    assert data.source == "torch" and data.location == "in memory"
    assert data.inputs.shape == (300, 1, 8, 8)
    np.testing.assert_array_equal(data.inputs[:, 0], digits.images[:300].astype(np.float32))
    np.testing.assert_array_equal(data.labels, digits.target[:300])
    assert data.classes == tuple(range(10))


def test_a_map_style_dataset_of_pil_rgb_images_becomes_channels_first(digits):
    class DigitPictures(torch.utils.data.Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, i):
            gray = (digits.images[i] * 15).astype(np.uint8)
            return Image.fromarray(np.stack([gray, 255 - gray, gray // 2], axis=-1), "RGB"), int(digits.target[i])

    data = load_data(DigitPictures())
    gray = (digits.images[:40] * 15).astype(np.uint8)
    assert data.inputs.shape == (40, 3, 8, 8)
    np.testing.assert_allclose(data.inputs[:, 0], gray / 255, rtol=1e-6)
    np.testing.assert_allclose(data.inputs[:, 1], (255 - gray) / 255, rtol=1e-6)
    np.testing.assert_allclose(data.inputs[:, 2], (gray // 2) / 255, rtol=1e-6)
    np.testing.assert_array_equal(data.labels, digits.target[:40])


class Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_a_dataset_whose_items_are_not_pairs_or_differ_in_shape_is_refused():
    refused("--data", r"item 0 of the range is not an \(input, label\) pair but int", load_data, range(3))
    ragged = Items([(np.zeros(4), 0), (np.zeros(5), 1)])
    refused("--data", r"item 1 has an input of shape \(5,\) but item 0 one of \(4,\)", load_data, ragged)
    refused("--data", "the Items is empty", load_data, Items([]))


def test_array_refusals_name_the_problem(digits):
    refused(
        "--data", r"X has shape \(1797, 64\) but y has shape \(1796,\)", load_data, (digits.data, digits.target[1:])
    )
    broken = digits.data.copy()
    broken[5, 3] = np.nan
    refused(
        "--data", r"inputs hold nan \(not a finite number\) in example 5, at \(3,\)", load_data, (broken, digits.target)
    )
    broken[5, 3] = np.inf
    refused("--data", "inputs hold inf", load_data, (broken, digits.target))
    refused("--data", r"got shape \(1797,\)", load_data, (digits.data[:, 0], digits.target))
    refused("--data", r"got one array of shape \(1797, 64\); pass \(X, y\)", load_data, digits.data)
    refused(
        "--data", "an \\(X, y\\) pair needs two arrays, got 3", load_data, (digits.data, digits.target, digits.target)
    )
    refused("--data", "inputs must be numbers, got dtype <U1", load_data, (np.array([["a"], ["b"]]), [0, 1]))
    refused("--data", "cannot use a dict as data", load_data, {"x": digits.data, "y": digits.target})


def test_an_existing_dataset_is_returned_as_it_is(digits):
    data = load_data((digits.data, digits.target))
    assert load_data(data) is data
    assert load_data(data, classes=tuple(range(10))) is data


def test_an_existing_dataset_is_renumbered_by_given_classes(iris):
    pair = iris.target >= 1  # versicolor and virginica, numbered 0 and 1 on their own
    own = load_data((iris.data[pair], iris.target_names[iris.target[pair]]))
    assert own.classes == ("versicolor", "virginica")
    renumbered = load_data(own, classes=("setosa", "versicolor", "virginica"))
    assert renumbered.classes == ("setosa", "versicolor", "virginica")
    np.testing.assert_array_equal(renumbered.labels, iris.target[pair])
    refused("--data", "label 'virginica' is not one of the training classes", load_data, own, classes=("versicolor",))


def test_options_of_other_kinds_are_ignored_so_one_set_loads_train_and_test(tmp_path, iris):
    train = load_data(f"csv:{write_iris_csv(tmp_path / 'iris.csv', iris)}", target="species", resize=(4, 4))
    test = load_data(
        (iris.data[:10], iris.target_names[iris.target[:10]]), target="species", resize=(4, 4), classes=train.classes
    )
    assert test.inputs.shape == (10, 4)
    np.testing.assert_array_equal(test.labels, np.zeros(10))


# Labels


def test_string_labels_are_numbered_in_sorted_order():
    labels, classes = encode_labels(np.array(["virginica", "setosa", "versicolor", "setosa"]))
    assert classes == ("setosa", "versicolor", "virginica") and all(type(c) is str for c in classes)
    np.testing.assert_array_equal(labels, [2, 0, 1, 0])
    assert labels.dtype == np.int64


def test_integral_floats_and_an_n_by_1_column_are_class_labels():
    labels, classes = encode_labels(np.array([[3.0], [1.0], [3.0], [-2.0]]))
    assert classes == (-2, 1, 3) and all(type(c) is int for c in classes)
    np.testing.assert_array_equal(labels, [2, 1, 2, 0])
    labels, classes = encode_labels([True, False, True])
    assert classes == (False, True)
    np.testing.assert_array_equal(labels, [1, 0, 1])


def test_python_object_labels_of_one_type_are_accepted():
    labels, classes = encode_labels(np.array(["b", "a", "b"], dtype=object))
    assert classes == ("a", "b")
    labels, classes = encode_labels(np.array([2, 0.0, 2], dtype=object))
    assert classes == (0, 2)
    np.testing.assert_array_equal(labels, [1, 0, 1])


def test_regression_one_hot_missing_single_class_and_mixed_labels_are_refused(iris, digits):
    text = refused("--data", "regression and multi-label targets are not supported yet", encode_labels, iris.data[:, 0])
    assert "the label of example 0 is 5.1, not a whole number" in text
    one_hot = np.eye(10)[digits.target]
    text = refused("--data", "regression and multi-label targets are not supported yet", encode_labels, one_hot)
    assert "(1797, 10)" in text
    refused("--data", "the label of example 2 is nan", encode_labels, np.array([0.0, 1.0, np.nan]))
    refused("--data", r"the label of example 1 is missing \(None\)", encode_labels, np.array(["a", None], dtype=object))
    refused("--data", "needs at least two classes; every label is 'setosa'", encode_labels, ["setosa"] * 5)
    refused("--data", "labels mix types: 1 \\(int\\), 'a' \\(str\\)", encode_labels, np.array([1, "a"], dtype=object))
    refused("--y", "there are no labels", encode_labels, np.array([]), "--y")


def test_fixed_classes_number_a_test_sets_labels_by_the_training_classes():
    labels, classes = encode_labels(["virginica", "virginica"], classes=("setosa", "versicolor", "virginica"))
    assert classes == ("setosa", "versicolor", "virginica")
    np.testing.assert_array_equal(labels, [2, 2])
    text = refused(
        "--test-data",
        "label 'daisy' is not one of the training classes",
        encode_labels,
        ["daisy"],
        "--test-data",
        classes=("setosa", "virginica"),
    )
    assert "'setosa', 'virginica'" in text


# CSV


def test_csv_with_species_names_as_labels(tmp_path, iris):
    path = write_iris_csv(tmp_path / "iris.csv", iris)
    data = load_data(f"csv:{path}", target="species")
    assert data.classes == ("setosa", "versicolor", "virginica")
    np.testing.assert_array_equal(data.labels, iris.target)  # iris' names are in alphabetical order
    np.testing.assert_allclose(data.inputs, iris.data.astype(np.float32))
    assert data.inputs.shape == (150, 4) and data.kind == "tabular"
    assert data.rows == tuple(range(150)) and data.paths is None
    assert (data.source, data.location) == ("csv", str(path))
    assert data.description == f"csv {path}: 150 examples, 4 features, 3 classes"


def test_a_bare_csv_path_is_read_as_csv(tmp_path, iris):
    path = write_iris_csv(tmp_path / "iris.csv", iris)
    assert load_data(str(path), target="species").summary() == load_data(f"csv:{path}", target="species").summary()


def test_csv_refusals_name_the_column_or_row(tmp_path, iris):
    path = write_iris_csv(tmp_path / "iris.csv", iris)
    text = refused("--target", "name the label column", load_data, f"csv:{path}")
    assert "'sepal_length', 'sepal_width', 'petal_length', 'petal_width', 'species'" in text
    refused(
        "--target",
        "'kind' is not a column of .*iris.csv; its columns are 'sepal_length'",
        load_data,
        f"csv:{path}",
        target="kind",
    )

    frame = pd.read_csv(path)
    frame.loc[7, "petal_width"] = np.nan
    frame.to_csv(path, index=False)
    refused(
        "--data",
        r"row 7 of .*iris.csv \(0-based, header excluded\) has no value in column 'petal_width'",
        load_data,
        f"csv:{path}",
        target="species",
    )

    frame = pd.read_csv(tmp_path / "iris.csv").fillna(0.2)
    frame["garden"] = ["north"] * 150
    frame.to_csv(path, index=False)
    refused(
        "--data",
        "column 'garden' of .*iris.csv is not numeric \\(row 0 holds 'north'\\)",
        load_data,
        f"csv:{path}",
        target="species",
    )

    frame = pd.read_csv(tmp_path / "iris.csv").drop(columns=["garden", "species"])
    frame["petal_width"] = frame["petal_width"] + 0.05  # a float target: regression
    frame.to_csv(path, index=False)
    refused(
        "--data",
        "regression and multi-label targets are not supported yet",
        load_data,
        f"csv:{path}",
        target="petal_width",
    )


def test_a_csv_test_set_is_numbered_by_the_training_classes(tmp_path, iris):
    train = load_data(f"csv:{write_iris_csv(tmp_path / 'train.csv', iris)}", target="species")
    test_path = write_iris_csv(tmp_path / "test.csv", iris, rows=slice(100, 150))  # virginica only
    test = load_data(f"csv:{test_path}", target="species", classes=train.classes, option="--test-data")
    assert test.classes == train.classes
    np.testing.assert_array_equal(test.labels, np.full(50, 2))
    check_compatible(train, test)
    # loaded on its own, a one-class test set is refused; with its own numbering it is incompatible
    refused(
        "--test-data",
        "needs at least two classes",
        load_data,
        f"csv:{test_path}",
        target="species",
        option="--test-data",
    )
    two = load_data(f"csv:{write_iris_csv(tmp_path / 'two.csv', iris, rows=slice(50, 150))}", target="species")
    refused("--test-data", "numbered by the test set's own classes", check_compatible, train, two)


# Image folders


def test_grayscale_image_folder_keeps_one_channel_and_lists_paths(tmp_path, digits):
    picks = {"seven": np.flatnonzero(digits.target == 7)[:3], "three": np.flatnonzero(digits.target == 3)[:3]}
    written = {}
    for name, indices in picks.items():
        for n, i in enumerate(indices):
            written[f"{name}/{n}.png"] = digit_png(tmp_path / "digits" / name / f"{n}.png", digits.images[i])
    (tmp_path / "digits" / "three" / "notes.txt").write_text("not an image")
    data = load_data(f"imagefolder:{tmp_path / 'digits'}")
    assert data.classes == ("seven", "three")
    assert data.paths == ("seven/0.png", "seven/1.png", "seven/2.png", "three/0.png", "three/1.png", "three/2.png")
    np.testing.assert_array_equal(data.labels, [0, 0, 0, 1, 1, 1])
    assert data.inputs.shape == (6, 1, 8, 8) and data.inputs.dtype == np.float32
    for image, path in zip(data.inputs, data.paths, strict=True):
        np.testing.assert_allclose(image[0], written[path] / 255, rtol=1e-6)
    assert (data.source, data.location) == ("imagefolder", str(tmp_path / "digits"))


def test_rgb_image_folder_has_three_channels_in_rgb_order(tmp_path, digits):
    written = {}
    for label in (0, 1, 2):
        for n, i in enumerate(np.flatnonzero(digits.target == label)[:2]):
            path = f"digit{label}/{n}.png"
            written[path] = digit_png(tmp_path / "rgb" / path, digits.images[i], "RGB")
    Image.fromarray(written["digit2/1.png"], "RGB").save(
        tmp_path / "rgb" / "digit2" / "2.jpg", quality=100, subsampling=0
    )
    data = load_data(f"imagefolder:{tmp_path / 'rgb'}")
    assert data.classes == ("digit0", "digit1", "digit2")
    assert data.inputs.shape == (7, 3, 8, 8) and data.paths[-1] == "digit2/2.jpg"
    np.testing.assert_array_equal(data.labels, [0, 0, 1, 1, 2, 2, 2])
    for image, path in zip(data.inputs, data.paths[:-1], strict=False):
        np.testing.assert_allclose(image, written[path].transpose(2, 0, 1) / 255, rtol=1e-6)
    assert np.abs(data.inputs[-1] - data.inputs[-2]).mean() < 0.05  # the JPEG copy, lossy but close


def test_a_folder_mixing_gray_and_rgb_images_is_all_rgb(tmp_path, digits):
    gray = digit_png(tmp_path / "mixed" / "a" / "gray.png", digits.images[0])
    digit_png(tmp_path / "mixed" / "b" / "colour.png", digits.images[1], "RGB")
    data = load_data(f"imagefolder:{tmp_path / 'mixed'}")
    assert data.inputs.shape == (2, 3, 8, 8)
    for channel in range(3):
        np.testing.assert_allclose(data.inputs[0, channel], gray / 255, rtol=1e-6)


def test_sixteen_bit_grayscale_pngs_are_scaled_by_65535(tmp_path, digits):
    for label in (0, 1):
        pixels = (digits.images[label] * 4000).astype(np.uint16)  # 0..64000
        (tmp_path / "deep" / str(label)).mkdir(parents=True)
        Image.fromarray(pixels).save(tmp_path / "deep" / str(label) / "x.png")
    data = load_data(f"imagefolder:{tmp_path / 'deep'}")
    assert data.inputs.shape == (2, 1, 8, 8) and data.classes == ("0", "1")
    np.testing.assert_allclose(data.inputs[1, 0], digits.images[1] * 4000 / 65535, rtol=1e-6)


def test_mixed_sizes_are_refused_naming_two_files_then_resized(tmp_path, digits):
    digit_png(tmp_path / "sizes" / "a" / "small.png", digits.images[0])
    (tmp_path / "sizes" / "b").mkdir()
    Image.fromarray((np.kron(digits.images[1], np.ones((2, 3))) * 15).astype(np.uint8)).save(
        tmp_path / "sizes" / "b" / "large.png"
    )  # 16x24
    text = refused(
        "--data",
        "images differ in size: a/small.png is 8x8 and b/large.png is 16x24",
        load_data,
        f"imagefolder:{tmp_path / 'sizes'}",
    )
    assert "pass --resize HxW" in text
    data = load_data(f"imagefolder:{tmp_path / 'sizes'}", resize=(12, 10))
    assert data.inputs.shape == (2, 1, 12, 10)
    assert 0.0 <= data.inputs.min() and data.inputs.max() <= 1.0


def test_image_folder_refusals_name_the_file_or_the_folders(tmp_path, digits):
    digit_png(tmp_path / "one" / "only" / "a.png", digits.images[0])
    refused(
        "--data",
        "needs one sub-folder per class, at least 2; it has 1 \\('only'\\)",
        load_data,
        f"imagefolder:{tmp_path / 'one'}",
    )
    digit_png(tmp_path / "bad" / "a" / "good.png", digits.images[0])
    (tmp_path / "bad" / "b").mkdir()
    (tmp_path / "bad" / "b" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    refused("--data", "cannot read image .*bad/b/corrupt.png", load_data, f"imagefolder:{tmp_path / 'bad'}")
    (tmp_path / "bad" / "b" / "corrupt.png").unlink()
    refused("--data", "class folder .*bad/b holds no images", load_data, f"imagefolder:{tmp_path / 'bad'}")
    refused("--data", "is not a folder", load_data, f"imagefolder:{tmp_path / 'bad' / 'a' / 'good.png'}")


# npz


def test_npz_with_default_and_custom_keys(tmp_path, digits):
    np.savez(tmp_path / "digits.npz", x=digits.images, y=digits.target)
    data = load_data(f"npz:{tmp_path / 'digits.npz'}")
    assert data.inputs.shape == (1797, 1, 8, 8) and data.source == "npz"
    assert data.location == str(tmp_path / "digits.npz")
    np.testing.assert_array_equal(data.labels, digits.target)
    np.savez(tmp_path / "named.npz", pixels=digits.data, digit=digits.target)
    named = load_data(str(tmp_path / "named.npz"), x_key="pixels", y_key="digit")
    assert named.inputs.shape == (1797, 64)
    np.testing.assert_array_equal(named.labels, digits.target)


def test_npz_refusals_list_the_keys_the_file_has(tmp_path, digits):
    np.savez(tmp_path / "named.npz", pixels=digits.data, digit=digits.target)
    text = refused(
        "--data", "named.npz has no array 'x'; it has 'pixels', 'digit'", load_data, f"npz:{tmp_path / 'named.npz'}"
    )
    assert "--x-key and --y-key" in text
    refused("--data", "has no array 'y'", load_data, f"npz:{tmp_path / 'named.npz'}", x_key="pixels")
    np.save(tmp_path / "bare.npy", digits.data)
    refused("--data", "holds a single array", load_data, f"npz:{tmp_path / 'bare.npy'}")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not a zip")
    refused("--data", "cannot read .*junk.npz", load_data, f"npz:{tmp_path / 'junk.npz'}")


# MNIST


def test_mnist_train_and_test_come_normalised_from_the_shipped_sample(sample_dir):
    mnist = load_mnist(sample_dir)
    train = load_data("mnist", data_dir=sample_dir)
    assert train.inputs.shape == (6000, 1, 28, 28) and train.normalized and train.source == "mnist"
    assert train.classes == tuple(range(10)) and train.location == mnist.location
    np.testing.assert_array_equal(train.inputs, normalize(mnist.train_images))
    np.testing.assert_array_equal(train.labels, mnist.train_labels)
    test = mnist_test(sample_dir)
    assert test.inputs.shape == (1000, 1, 28, 28) and test.normalized
    np.testing.assert_array_equal(test.labels, mnist.test_labels)
    check_compatible(train, test)
    refused("--data", "mnist takes no path", load_data, f"mnist:{sample_dir}")


# Kinds, paths and options


def test_unknown_kinds_and_missing_paths_are_refused(tmp_path):
    refused(
        "--data",
        "unknown data kind 'parquet'; use mnist, imagefolder:DIR, npz:FILE or csv:FILE",
        load_data,
        "parquet:x.parquet",
    )
    refused("--data", f"{tmp_path / 'nowhere.csv'} does not exist", load_data, f"csv:{tmp_path / 'nowhere.csv'}")
    refused("--test-data", "nowhere does not exist", load_data, "nowhere", option="--test-data")
    refused("--data", "csv: needs a path after the colon", load_data, "csv:")
    refused("--data", "say what .* is: imagefolder:", load_data, str(tmp_path))


def test_resize_is_height_by_width_or_one_side_for_both():
    assert parse_resize("64x48") == (64, 48)
    assert parse_resize("32") == (32, 32)
    assert parse_resize(" 10 X 20 ") == (10, 20)
    refused("--resize", "must be HxW", parse_resize, "64by48")
    refused("--resize", "sides must be at least 1", parse_resize, "0x5")


# Folds, compatibility, summaries and subsets


def test_k_larger_than_the_smallest_class_names_that_class(tmp_path, iris):
    keep = np.r_[0:50, 50:53, 100:150]  # 3 versicolor
    data = load_data((iris.data[keep], iris.target_names[iris.target[keep]]))
    check_folds_possible(data, 3)
    refused(
        "--k",
        r"4 folds but the smallest class has only 3 examples \(class 'versicolor'\)",
        check_folds_possible,
        data,
        4,
    )
    refused("--k", "must be at least 2, got 1", check_folds_possible, data, 1)


def test_test_sets_with_another_shape_extra_classes_or_other_scaling_are_incompatible(digits, sample_dir):
    train = load_data((digits.images[digits.target < 5], digits.target[digits.target < 5]))
    test = load_data((digits.images, digits.target))
    refused(
        "--test-data",
        r"test classes 5, 6, 7, 8, 9 are not among the training classes 0, 1, 2, 3, 4",
        check_compatible,
        train,
        test,
    )
    refused(
        "--test-data",
        "test inputs are 64 but the training inputs are 1x8x8",
        check_compatible,
        train,
        load_data((digits.data, digits.target)),
    )
    refused(
        "--data",
        "label 5 is not one of the training classes",
        load_data,
        (digits.images, digits.target),
        classes=train.classes,
    )
    mnist = load_data("mnist", data_dir=sample_dir)
    raw = load_mnist(sample_dir)
    unnormalised = load_data((raw.test_images, raw.test_labels))
    refused("--test-data", "only the training inputs are normalised", check_compatible, mnist, unnormalised)


def test_summary_is_json_and_its_digest_follows_every_label(digits):
    data = load_data((digits.images, digits.target))
    summary = data.summary()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["examples"] == 1797 and summary["input_shape"] == [1, 8, 8]
    assert summary["classes"] == list(range(10)) and summary["source"] == "arrays"
    assert summary["normalized"] is False and len(summary["digest"]) == 16
    assert load_data((digits.images.copy(), digits.target.copy())).summary()["digest"] == summary["digest"]
    changed = digits.target.copy()
    changed[100] = (changed[100] + 1) % 10
    assert load_data((digits.images, changed)).summary()["digest"] != summary["digest"]


def test_subset_keeps_classes_and_slices_rows_and_paths(tmp_path, iris):
    data = load_data(f"csv:{write_iris_csv(tmp_path / 'iris.csv', iris)}", target="species")
    part = data.subset(np.array([149, 0, 75]))
    assert part.classes == data.classes and part.rows == (149, 0, 75)
    np.testing.assert_array_equal(part.labels, [2, 0, 1])
    np.testing.assert_array_equal(part.inputs, iris.data[[149, 0, 75]].astype(np.float32))
    masked = data.subset(iris.target == 1)
    assert masked.rows == tuple(range(50, 100)) and masked.size == 50
    with_paths = Dataset(data.inputs[:2].copy(), np.array([0, 1]), ("a", "b"), "imagefolder", "x", paths=("p", "q"))
    assert with_paths.subset(np.array([1])).paths == ("q",)


def test_importing_the_module_loads_neither_torch_nor_pandas_nor_pil():
    code = "import sys, distml.datasets; print(sorted(m for m in ('torch', 'pandas', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
