import gzip

import numpy as np
import pytest

from distml.data import (
    FILE_STEMS,
    IMAGE_MAGIC,
    LABEL_MAGIC,
    MNIST_MEAN,
    MNIST_STD,
    load_folder,
    load_mnist,
    normalize,
    read_idx,
    write_idx,
)
from distml.errors import DistmlError


def write_mnist(folder, n_train=20, n_test=10, gz=True):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    write_idx(folder / f"{FILE_STEMS['train_images']}{suffix}", rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(folder / f"{FILE_STEMS['train_labels']}{suffix}", np.arange(n_train) % 10)
    write_idx(folder / f"{FILE_STEMS['test_images']}{suffix}", rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(folder / f"{FILE_STEMS['test_labels']}{suffix}", np.arange(n_test) % 10)
    return folder


@pytest.mark.parametrize("gz", [True, False])
def test_good_idx_files_round_trip(tmp_path, gz):
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    path = write_idx(tmp_path / ("x.gz" if gz else "x"), images)
    np.testing.assert_array_equal(read_idx(path, IMAGE_MAGIC), images)


def test_truncated_file_is_named_in_a_one_line_error(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((4, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DistmlError, match=r"train-images-idx3-ubyte is truncated: shape \(4, 28, 28\)") as info:
        read_idx(path, IMAGE_MAGIC)
    assert "\n" not in str(info.value)


def test_bad_magic_and_short_header_and_bad_gzip(tmp_path):
    labels = write_idx(tmp_path / "labels", np.zeros(5, np.uint8))
    with pytest.raises(DistmlError, match="magic number 0x00000801, expected 0x00000803"):
        read_idx(labels, IMAGE_MAGIC)
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x03\x00")
    with pytest.raises(DistmlError, match="short is truncated: its header needs 16 bytes"):
        read_idx(tmp_path / "short", IMAGE_MAGIC)
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DistmlError, match="cannot read IDX file .*bad.gz"):
        read_idx(tmp_path / "bad.gz", LABEL_MAGIC)


def test_folder_checks_counts_and_labels(tmp_path):
    folder = write_mnist(tmp_path)
    write_idx(folder / f"{FILE_STEMS['train_labels']}.gz", np.arange(19) % 10)
    with pytest.raises(DistmlError, match="20 train images but 19 labels"):
        load_folder(folder, "data-dir")
    write_idx(folder / f"{FILE_STEMS['train_labels']}.gz", np.full(20, 12))
    with pytest.raises(DistmlError, match="label 12 is not a digit"):
        load_folder(folder, "data-dir")


def test_missing_files_are_listed(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / f"{FILE_STEMS['test_labels']}.gz").unlink()
    with pytest.raises(DistmlError, match="lacks the MNIST IDX files t10k-labels-idx1-ubyte"):
        load_folder(tmp_path, "data-dir")


def test_data_dir_beats_cache_and_env(tmp_path, monkeypatch):
    explicit = tmp_path / "explicit"
    explicit.mkdir()
    write_mnist(explicit, n_train=30)
    cache = tmp_path / "cache"
    cache.mkdir()
    write_mnist(cache, n_train=40)
    monkeypatch.setenv("DISTML_CACHE_DIR", str(cache))
    assert load_mnist(explicit).source == "data-dir"
    assert len(load_mnist(explicit).train_labels) == 30
    monkeypatch.setenv("DISTML_DATA_DIR", str(explicit))
    assert load_mnist().source == "data-dir"
    monkeypatch.delenv("DISTML_DATA_DIR")
    found = load_mnist()
    assert (found.source, len(found.train_labels)) == ("cache", 40)


def test_cache_in_torchvision_layout_is_found(tmp_path, monkeypatch):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_mnist(raw, gz=False)
    monkeypatch.setenv("DISTML_CACHE_DIR", str(tmp_path))
    assert load_mnist().location == str(raw)


def test_offline_without_files_falls_back_to_the_shipped_sample_with_a_warning():
    with pytest.warns(UserWarning, match="using the MNIST sample shipped with distml"):
        data = load_mnist()
    assert data.source == "bundled-sample"
    assert (len(data.train_labels), len(data.test_labels)) == (6000, 1000)
    assert np.bincount(data.train_labels).min() >= 540  # a stratified subset: every digit well represented
    assert "6,000 training and 1,000 test images" in data.description


def test_missing_data_dir_is_an_error_not_a_fallback(tmp_path):
    with pytest.raises(DistmlError, match="--data-dir: .*nowhere is not a folder"):
        load_mnist(tmp_path / "nowhere")


def test_shipped_sample_is_real_mnist(sample_dir, full_mnist_dir):
    sample = load_folder(sample_dir, "sample")
    full = load_folder(full_mnist_dir, "data-dir")
    # every sample image is one of the official training images, with its label
    lookup = {full.train_images[i].tobytes(): full.train_labels[i] for i in range(len(full.train_labels))}
    for image, label in zip(sample.train_images[:200], sample.train_labels[:200], strict=True):
        assert lookup[image.tobytes()] == label


def test_normalize_matches_torchvision_normalize():
    images = np.array([[[0, 255]]], dtype=np.uint8).repeat(28, 1).repeat(14, 2)[:, :28, :28]
    out = normalize(images)
    assert out.shape == (1, 1, 28, 28) and out.dtype == np.float32
    assert out.min() == pytest.approx((0 - MNIST_MEAN) / MNIST_STD, abs=1e-5)
    assert out.max() == pytest.approx((1 - MNIST_MEAN) / MNIST_STD, abs=1e-5)


def test_gzip_member_is_reproducible(tmp_path):
    a = write_idx(tmp_path / "a.gz", np.ones((2, 28, 28), np.uint8)).read_bytes()
    b = write_idx(tmp_path / "b.gz", np.ones((2, 28, 28), np.uint8)).read_bytes()
    assert a == b and gzip.decompress(a)[:4] == b"\x00\x00\x08\x03"
